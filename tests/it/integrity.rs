//! Integrity (issue 19): one run at a time on a run folder.

use std::path::PathBuf;
use std::process::Command;

use crate::common::{fixtures, stage_dir, write_experiment};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-integrity-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn experiment(name: &str) -> PathBuf {
    let dir = scratch(name);
    let model = |m: &str| fixtures::model_dir(m).display().to_string();
    let models =
        format!("[target]\nmodel = \"{}\"\n[[sources]]\nmodel = \"{}\"\n", model("tiny-llama2"), model("tiny-mpt"));
    write_experiment(&dir, &models, 4);
    dir
}

/// A second `fusellm run` of the folder while the first holds it is refused with the
/// holder's pid; the first computes every stage once, and metrics.jsonl has each step once.
#[test]
fn a_second_run_on_a_folder_in_use_is_refused_with_the_holder() {
    let dir = experiment("lock");
    let mut first = Command::new(env!("CARGO_BIN_EXE_fusellm")).current_dir(&dir).args(["run", "run.toml"]).spawn().unwrap();
    let lock = dir.join("out/cache/.fusellm.lock");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|t| t.contains("pid")) {
        assert!(started.elapsed().as_secs() < 60, "the first run never took the lock");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = crate::common::fusellm_in(&dir, &["run", "run.toml"]);
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second run went on: {message}");
    assert!(message.contains("is in use by") && message.contains(&format!("pid {}", first.id())), "{message}");
    assert!(first.wait().unwrap().success());
    let steps: Vec<u64> = std::fs::read_to_string(stage_dir(&dir, "train").join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    // Released: a third run reuses every stage.
    let third = crate::common::fusellm_in(&dir, &["run", "run.toml"]);
    assert!(third.status.success(), "{}", String::from_utf8_lossy(&third.stderr));
}
