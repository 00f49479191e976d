//! The README's main job, small: `appliance demo` starts the emulator as a child process,
//! issues invoices on every shard, verifies them (unique numbers, check codes, tax codes
//! accepted by the tax server on upload, idempotent replays) and prints the report.

use std::process::Command;

#[test]
fn demo_issues_verifies_and_reports() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let output = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args([
            "demo",
            "--invoices",
            "20000",
            "--shards",
            "2",
            "--batch",
            "500",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .expect("appliance runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed: {stdout}\n{stderr}");
    assert!(stdout.contains("issued 20000 invoices"), "{stdout}");
    assert!(
        stdout.contains("verified: 20000 unique numbers"),
        "{stdout}"
    );
    for stage in ["queue_wait", "tax_code", "journal_commit", "total"] {
        assert!(
            stdout.contains(&format!("stage {stage}")),
            "no {stage} table: {stdout}"
        );
    }
    // Both shards served: a row per shard and the all-shards row in the latency table.
    let total_table = stdout.split("stage total").nth(1).unwrap();
    for row in ["     0 ", "     1 ", "   all "] {
        assert!(
            total_table.contains(row),
            "missing row {row:?}: {total_table}"
        );
    }
    assert!(
        !dir.exists(),
        "the demo removes its data dir unless --keep-data"
    );
}
