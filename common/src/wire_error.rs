//! Stable error codes on the wire. A refusal that a peer acts on (resend parts whole, adopt a
//! newer epoch, drop one change, go to the active region) carries a `google.rpc.ErrorInfo` in
//! the `tonic::Status` details, as the gRPC richer error model and Google's AIP-193 define it
//! (built and read with `tonic-types`): `reason` is the [`ErrorCode`] in SCREAMING_SNAKE_CASE,
//! `domain` is [`DOMAIN`], `metadata` holds the typed fields (`epoch`, `change_id`, `path`,
//! `region`). Peers decide from [`WireError::of`], never from the message text, which is for
//! people and may change.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of Lifeboat's errors.
pub const DOMAIN: &str = "lifeboat";

/// What went wrong, as the peer needs to know it. The names are stable wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A change or order carries an epoch older than the current one (`epoch`: the current
    /// one). gRPC `FAILED_PRECONDITION`.
    StaleEpoch,
    /// A blob the batch reuses (a `reuse` part or a delta base) is missing or was removed by
    /// garbage collection: resend the parts whole. gRPC `FAILED_PRECONDITION`.
    BaseMissing,
    /// This region is a standby: writes go to the active region (`region`, `epoch` when
    /// known). gRPC `FAILED_PRECONDITION`.
    StandbyRegion,
    /// One change of a batch is invalid (`change_id`, `path`): drop it and send the others.
    /// gRPC `INVALID_ARGUMENT`.
    InvalidChange,
}

impl ErrorCode {
    /// Every code, for decoding.
    pub const ALL: [ErrorCode; 4] = [
        ErrorCode::StaleEpoch,
        ErrorCode::BaseMissing,
        ErrorCode::StandbyRegion,
        ErrorCode::InvalidChange,
    ];

    /// The wire value (`ErrorInfo.reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::StaleEpoch => "STALE_EPOCH",
            ErrorCode::BaseMissing => "BASE_MISSING",
            ErrorCode::StandbyRegion => "STANDBY_REGION",
            ErrorCode::InvalidChange => "INVALID_CHANGE",
        }
    }

    /// The gRPC code that goes with it.
    pub fn grpc(self) -> Code {
        match self {
            ErrorCode::InvalidChange => Code::InvalidArgument,
            ErrorCode::StaleEpoch | ErrorCode::BaseMissing | ErrorCode::StandbyRegion => {
                Code::FailedPrecondition
            }
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A coded refusal: [`ErrorCode`] plus the fields that apply to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    /// What went wrong.
    pub code: ErrorCode,
    /// The current epoch (`StaleEpoch`, `StandbyRegion`).
    pub epoch: Option<u64>,
    /// The refused change (`InvalidChange`).
    pub change_id: Option<u64>,
    /// The wire path of the refused change (`InvalidChange`).
    pub path: Option<String>,
    /// The active region (`StandbyRegion`).
    pub region: Option<String>,
}

impl WireError {
    /// A refusal with `code` and no fields.
    pub fn new(code: ErrorCode) -> Self {
        WireError {
            code,
            epoch: None,
            change_id: None,
            path: None,
            region: None,
        }
    }

    /// With the current epoch.
    pub fn epoch(mut self, epoch: u64) -> Self {
        self.epoch = Some(epoch);
        self
    }

    /// With the refused change.
    pub fn change(mut self, change_id: u64, path: impl Into<String>) -> Self {
        self.change_id = Some(change_id);
        self.path = Some(path.into());
        self
    }

    /// With the active region.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// The `Status` to answer: [`ErrorCode::grpc`], `message` for people, this error in the
    /// details.
    pub fn status(self, message: impl Into<String>) -> Status {
        let mut metadata = HashMap::new();
        if let Some(e) = self.epoch {
            metadata.insert("epoch".to_string(), e.to_string());
        }
        if let Some(c) = self.change_id {
            metadata.insert("change_id".to_string(), c.to_string());
        }
        if let Some(p) = self.path {
            metadata.insert("path".to_string(), p);
        }
        if let Some(r) = self.region {
            metadata.insert("region".to_string(), r);
        }
        Status::with_error_details(
            self.code.grpc(),
            message,
            ErrorDetails::with_error_info(self.code.as_str(), DOMAIN, metadata),
        )
    }

    /// The coded refusal carried by `status`, if any: `None` for a status without Lifeboat
    /// details (another server, a transport failure), an unknown code (a newer peer), or
    /// malformed fields (a number that does not parse drops the whole detail).
    pub fn of(status: &Status) -> Option<WireError> {
        let info = status.get_details_error_info()?;
        if info.domain != DOMAIN {
            return None;
        }
        let code = ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == info.reason)?;
        let num = |k: &str| -> Result<Option<u64>, ()> {
            info.metadata
                .get(k)
                .map(|v| v.parse::<u64>().map_err(|_| ()))
                .transpose()
        };
        Some(WireError {
            code,
            epoch: num("epoch").ok()?,
            change_id: num("change_id").ok()?,
            path: info.metadata.get("path").cloned(),
            region: info.metadata.get("region").cloned(),
        })
    }

    /// The code carried by `status`, if any (see [`WireError::of`]).
    pub fn code_of(status: &Status) -> Option<ErrorCode> {
        WireError::of(status).map(|w| w.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_status_details() {
        let s = WireError::new(ErrorCode::StaleEpoch)
            .epoch(12)
            .status("change stamped with epoch 1");
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(s.message(), "change stamped with epoch 1");
        let w = WireError::of(&s).expect("details");
        assert_eq!(w.code, ErrorCode::StaleEpoch);
        assert_eq!(w.epoch, Some(12));
        let s = WireError::new(ErrorCode::InvalidChange)
            .change(7, "data/a b")
            .status("bad");
        assert_eq!(s.code(), Code::InvalidArgument);
        let w = WireError::of(&s).unwrap();
        assert_eq!(
            (w.change_id, w.path.as_deref()),
            (Some(7), Some("data/a b"))
        );
        // Survives the trip through HTTP/2 trailers (header encoding of the details).
        let http = s.into_http::<()>();
        let back = Status::from_header_map(http.headers()).unwrap();
        assert_eq!(WireError::of(&back), Some(w));
    }

    #[test]
    fn text_alone_is_not_a_code() {
        assert_eq!(
            WireError::of(&Status::failed_precondition(
                "stale_epoch: the current epoch is 12"
            )),
            None
        );
        let foreign = Status::with_error_details(
            Code::FailedPrecondition,
            "x",
            ErrorDetails::with_error_info("STALE_EPOCH", "example.com", HashMap::new()),
        );
        assert_eq!(WireError::of(&foreign), None);
        let mut bad = HashMap::new();
        bad.insert("epoch".to_string(), "twelve".to_string());
        let malformed = Status::with_error_details(
            Code::FailedPrecondition,
            "x",
            ErrorDetails::with_error_info("STALE_EPOCH", DOMAIN, bad),
        );
        assert_eq!(WireError::of(&malformed), None);
    }
}
