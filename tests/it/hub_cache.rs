//! Models by Hugging Face id, found offline in a Hugging Face cache laid out as
//! `huggingface_hub` writes it (refs naming a commit, snapshots of symlinks into blobs).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{fixtures, write_experiment};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A cache in `dir/hub` holding the fixture `model` as `fixture-org/<model>` at `main`.
fn cache(dir: &Path, model: &str) -> PathBuf {
    let hub = dir.join("hub");
    let repo = hub.join(format!("models--fixture-org--{model}"));
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    for entry in std::fs::read_dir(fixtures::model_dir(model)).unwrap() {
        let file = entry.unwrap().path();
        let name = file.file_name().unwrap().to_owned();
        // Blobs are named by hash; the name here only has to be unique.
        let blob = repo.join("blobs").join(&name);
        std::os::unix::fs::symlink(&file, &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(&name)).unwrap();
    }
    hub
}

fn fusellm(dir: &Path, hub: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fusellm"))
        .current_dir(dir)
        .env("HF_HUB_CACHE", hub)
        .env_remove("HF_HOME")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_hub_id_resolves_in_the_local_cache_and_an_absent_one_says_how_to_fetch_it() {
    let dir = std::env::temp_dir().join(format!("fusellm-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let hub = cache(&dir, "tiny-llama2");
    let generate = |model: &str| {
        let args = ["generate", "--model", model, "--prompt", "The quick brown fox", "--max-new-tokens", "6", "--ids"];
        fusellm(&dir, &hub, &args)
    };
    // The id gives what the folder gives.
    let by_id = generate("fixture-org/tiny-llama2");
    assert!(by_id.status.success(), "{}", String::from_utf8_lossy(&by_id.stderr));
    let by_path = generate(fixtures::model_dir("tiny-llama2").to_str().unwrap());
    assert_eq!(by_id.stdout, by_path.stdout);
    // An id not in the cache: the cache folder and the command that fetches it.
    let absent = generate("fixture-org/absent");
    let e = String::from_utf8_lossy(&absent.stderr);
    assert!(!absent.status.success());
    assert!(e.contains(&hub.display().to_string()) && e.contains("huggingface-cli download fixture-org/absent"), "{e}");

    // In a config: by id at main, by commit, and a revision that is not there.
    let model = |extra: &str| {
        format!("[target]\nmodel = \"fixture-org/tiny-llama2\"\n{extra}[[sources]]\nmodel = \"fixture-org/tiny-llama2\"\nname = \"same\"\n")
    };
    for extra in ["", &format!("revision = \"{COMMIT}\"\n")] {
        write_experiment(&dir, &model(extra), 2);
        let out = fusellm(&dir, &hub, &["validate", "run.toml"]);
        assert!(out.status.success(), "{extra}: {}", String::from_utf8_lossy(&out.stderr));
    }
    write_experiment(&dir, &model("revision = \"v2\"\n"), 2);
    let out = fusellm(&dir, &hub, &["validate", "run.toml"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("target.model") && e.contains("(revision v2)") && e.contains("--revision v2"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
