//! Compiles `proto/lifeboat/v1/*.proto` with a vendored protoc (no system protoc needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: build scripts are single-threaded; setting PROTOC before codegen is the documented way.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let files = [
        "proto/lifeboat/v1/agent.proto",
        "proto/lifeboat/v1/admin.proto",
        "proto/lifeboat/v1/control.proto",
        "proto/lifeboat/v1/raft.proto",
        "proto/lifeboat/v1/replication.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    // The control plane's messages are printed by `lifeboat ... --output json`.
    tonic_prost_build::configure()
        .message_attribute(".lifeboat.v1", "#[derive(serde::Serialize)]")
        .enum_attribute(".lifeboat.v1", "#[derive(serde::Serialize)]")
        .compile_protos(&files, &["proto"])?;
    Ok(())
}
