//! New-user safety (issue 15): an agent with a missing TLS file exits naming it; a closed
//! stdout never makes the CLI panic; the demo refuses a --workdir inside --source and leaves the
//! source byte-equal.

use std::process::{Command, Stdio};
use std::time::Duration;

use lifeboat_chaos_tests::Scratch;

fn bin(name: &str) -> std::path::PathBuf {
    lifeboat_lab::harness::bin_dir()
        .expect("binaries built")
        .join(name)
}

#[test]
fn agent_with_missing_tls_file_exits_naming_it() {
    let s = Scratch::new("agent-tls");
    let missing = s.dir.join("no-such-ca.pem");
    let cfg = s.dir.join("agent.toml");
    std::fs::create_dir_all(s.dir.join("src")).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "agent_id = \"a1\"\nregion = \"r\"\ndata_dir = \"{d}/data\"\ncoordinators = [\"127.0.0.1:1\"]\n[[paths]]\nname = \"data\"\npath = \"{d}/src\"\n[tls]\nca = \"{m}\"\ncert = \"{m}\"\nkey = \"{m}\"\n",
            d = s.dir.display(),
            m = missing.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("lifeboat-agent"))
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent kept running with a missing TLS file");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "agent exited 0: {err}");
    assert!(
        err.contains("no-such-ca.pem"),
        "error names the file: {err}"
    );
}

#[test]
fn closed_stdout_is_no_panic() {
    let s = Scratch::new("epipe");
    let mut child = Command::new(bin("lifeboat"))
        .args(["certs", "init", "--dir"])
        .arg(s.dir.join("certs"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before the first line
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

#[test]
fn demo_refuses_workdir_inside_source_and_leaves_it_equal() {
    let s = Scratch::new("demo-src");
    let src = s.dir.join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("sentinel.txt"), b"precious").unwrap();
    let out = Command::new(bin("lifeboat"))
        .args(["demo", "--single-region", "--source"])
        .arg(&src)
        .arg("--workdir")
        .arg(src.join("wd"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("inside --source"), "{err}");
    assert_eq!(
        std::fs::read(src.join("sentinel.txt")).unwrap(),
        b"precious"
    );
    assert_eq!(
        std::fs::read_dir(&src).unwrap().count(),
        1,
        "nothing created in the source"
    );
}

#[test]
fn demo_keeps_a_pre_existing_workdir_and_removes_only_its_run_dir() {
    let s = Scratch::new("demo-wd");
    let wd = s.dir.join("wd");
    std::fs::create_dir_all(&wd).unwrap();
    std::fs::write(wd.join("sentinel.txt"), b"mine").unwrap();
    let out = Command::new(bin("lifeboat"))
        .args([
            "demo",
            "--single-region",
            "--files",
            "40",
            "--large-mb",
            "1",
            "--workdir",
        ])
        .arg(&wd)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {err}");
    assert_eq!(
        std::fs::read(wd.join("sentinel.txt")).unwrap(),
        b"mine",
        "the sentinel in the pre-existing workdir survives"
    );
    let left: Vec<_> = std::fs::read_dir(&wd)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("sentinel.txt")],
        "only the run dir is removed"
    );
}

/// Restores `data` of `cluster` into `to` with extra CLI args.
fn restore_cli(
    cluster: &lifeboat_chaos_tests::Cluster,
    to: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec!["restore", "--path", "data", "--to", to.to_str().unwrap()];
    args.extend_from_slice(extra);
    lifeboat_chaos_tests::lifeboat(cluster, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_into_a_non_empty_dir_keeps_local_files_unless_asked() -> anyhow::Result<()> {
    use lifeboat_chaos_tests::*;
    run("restore_policy", |dir| async move {
        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("a.txt"), b"version in the catalog")?;
        std::fs::write(src.join("b.txt"), b"only in the catalog")?;
        let cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        settled_leader(&cluster).await?;
        let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
        agent_once(&cluster, &cfg, &data).await?;

        let to = dir.join("to");
        // Restore writes catalog paths under the target: `data/a.txt` lands in `to/data/a.txt`.
        let local = to.join("data");
        std::fs::create_dir_all(&local)?;
        std::fs::write(local.join("a.txt"), b"local edit")?;
        std::fs::write(local.join("local-only.txt"), b"keep me")?;

        // Default (never): refused up front, naming the file, nothing written.
        let out = restore_cli(&cluster, &to, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "a restore over a local file succeeded"
        );
        assert!(err.contains("a.txt"), "the refusal names the file: {err}");
        assert_eq!(std::fs::read(local.join("a.txt"))?, b"local edit");
        assert!(
            !local.join("b.txt").exists(),
            "a refused restore wrote something"
        );

        // Dry run of `always`: says what it would overwrite, writes nothing.
        let out = restore_cli(&cluster, &to, &["--overwrite", "always", "--dry-run"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("1 to overwrite"), "{said}");
        assert_eq!(std::fs::read(local.join("a.txt"))?, b"local edit");
        assert!(!local.join("b.txt").exists());

        // `always`: the catalog's version wins; files the catalog lacks are left alone.
        let out = restore_cli(&cluster, &to, &["--overwrite", "always"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read(local.join("a.txt"))?,
            b"version in the catalog"
        );
        assert_eq!(std::fs::read(local.join("b.txt"))?, b"only in the catalog");
        assert_eq!(std::fs::read(local.join("local-only.txt"))?, b"keep me");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_members_of_an_initialized_group_are_reported_at_start() -> anyhow::Result<()> {
    use lifeboat_chaos_tests::*;
    run("members_drift", |dir| async move {
        let mut cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        settled_leader(&cluster).await?;
        // A config edited after the group was founded (here: coord 1's address in coord 3's
        // `[[members]]`): the stored membership wins, and the node says so.
        cluster.kill_coordinator(2);
        let cfg = cluster.coords[2].config.clone();
        let toml = std::fs::read_to_string(&cfg)?;
        let old = format!("addr = \"{}\"", cluster.coords[0].addr);
        assert!(toml.contains(&old), "{toml}");
        std::fs::write(&cfg, toml.replace(&old, "addr = \"127.0.0.9:1\""))?;
        cluster.start_coordinator(2)?;
        let mut warnings = Vec::new();
        wait_until(
            Duration::from_secs(30),
            "the node reports the drift",
            || {
                let st = futures::executor::block_on(cluster.status_of(2));
                warnings = st.map(|s| s.config_warnings).unwrap_or_default();
                !warnings.is_empty()
            },
        )
        .await?;
        assert!(
            warnings[0].contains("[[members]]") && warnings[0].contains("127.0.0.9:1"),
            "{warnings:?}"
        );
        let out = Command::new(bin("lifeboat"))
            .args([
                "status",
                "--coordinator",
                &cluster.coords[2].addr,
                "--tls-dir",
            ])
            .arg(&cluster.certs)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("WARNING"), "{text}");
        Ok(())
    })
    .await
}
