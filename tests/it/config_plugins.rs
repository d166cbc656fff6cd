//! Plugins chosen in TOML: by name or from a file, with parameters checked against the
//! plugin's schema, and errors that name the file, line and key.

use std::path::PathBuf;

use crate::common::{dylib, wasm};
use fusellm_core::config::{Config, ConfigError};
use fusellm_core::plugins::conformance::{synthetic_input, Shape};
use fusellm_core::plugins::{Configured, Registry};

fn write_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Loads a config and its fusion plugin the way a run does, returning the error.
fn load_error(name: &str, text: &str) -> ConfigError {
    let path = write_config(name, text);
    let result = Config::load(&path).and_then(|config| {
        let mut registry = Registry::with_builtins().unwrap();
        config.load_plugins(&mut registry)?;
        config.fusion.as_ref().expect("a [fusion] section").load(&mut registry).map(|_| ())
    });
    result.expect_err("the config should be refused")
}

fn toml_path(p: &std::path::Path) -> String {
    p.display().to_string().replace('\\', "/")
}

#[test]
fn the_example_plugin_runs_from_a_config_in_both_forms() {
    let input = synthetic_input(3, Shape { positions: 32, candidates: 3, top_k: 10, vocab: 32000, unaligned: 0.1 });
    let mut outputs = Vec::new();
    for (key, file) in [("dylib", dylib("entropy_fusion")), ("wasm", wasm("entropy_fusion"))] {
        let text = format!(
            "[fusion]\nplugin = {{ {key} = \"{}\", name = \"entropy_weighted\" }}\n[fusion.params]\neps = 0.5\n",
            toml_path(&file)
        );
        let config = Config::load(&write_config(&format!("example-{key}.toml"), &text)).unwrap();
        let mut registry = Registry::with_builtins().unwrap();
        let Configured { entry, params } = config.fusion.as_ref().unwrap().load(&mut registry).unwrap();
        assert_eq!(entry.tier.as_str(), key);
        assert_eq!(params.read::<f64>("eps"), Ok(0.5));
        outputs.push(entry.fuse(&params, &input.view()).unwrap());
    }
    assert!(outputs[0].bit_identical(&outputs[1]), "dylib and wasm forms differ");
}

#[test]
fn a_file_with_one_fusion_plugin_needs_no_name() {
    let text = format!("[fusion]\nplugin = {{ wasm = \"{}\" }}\n", toml_path(&wasm("entropy_fusion")));
    let config = Config::load(&write_config("no-name.toml", &text)).unwrap();
    let mut registry = Registry::with_builtins().unwrap();
    let entry = config.fusion.as_ref().unwrap().load(&mut registry).unwrap().entry;
    assert_eq!(entry.info.name, "entropy_weighted");
}

#[test]
fn built_in_plugins_are_chosen_by_name_with_typed_params() {
    let path = write_config(
        "builtin.toml",
        "[fusion]\nplugin = \"avg_ce\"\n[fusion.params]\nweights = \"softmax\"\ntau = 2\n",
    );
    let config = Config::load(&path).unwrap();
    let mut registry = Registry::with_builtins().unwrap();
    let Configured { entry, params } = config.fusion.as_ref().unwrap().load(&mut registry).unwrap();
    assert_eq!(entry.info.name, "avg_ce");
    assert_eq!(params.read::<String>("weights").as_deref(), Ok("softmax"));
    assert_eq!(params.read::<f64>("tau"), Ok(2.0), "an integer widens to a float parameter");
    assert_eq!(params.read::<String>("granularity").as_deref(), Ok("document"), "defaults are filled in");
}

/// A vocabulary mapper is no sequence aligner, nor the reverse: refused when the plugins
/// load, where the config names it, before any model is run.
#[test]
fn an_aligner_of_the_other_kind_is_refused_at_its_key() {
    let path = write_config("kinds.toml", "[align.sequence]\nplugin = \"mined\"\n");
    let config = Config::load(&path).unwrap();
    let e = config.load_plugins(&mut Registry::with_builtins().unwrap()).unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (2, "align.sequence.plugin"));
    assert!(e.message.contains("is a vocabulary mapper plugin, not a sequence aligner plugin"), "{e}");
    let path = write_config("kinds2.toml", "[align.vocab]\nplugin = \"dtw\"\n");
    let config = Config::load(&path).unwrap();
    let e = config.load_plugins(&mut Registry::with_builtins().unwrap()).unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (2, "align.vocab.plugin"));
    assert!(e.message.contains("is a sequence aligner plugin, not a vocabulary mapper plugin"), "{e}");
}

#[test]
fn an_unknown_plugin_name_gets_the_nearest_one() {
    let e = load_error("typo.toml", "# experiment\n[fusion]\nplugin = \"mince\"\n");
    assert_eq!((e.line, e.key.as_str()), (3, "fusion.plugin"));
    assert!(e.message.contains("unknown fusion plugin `mince`; did you mean `min_ce`?"), "{e}");
    assert!(e.to_string().starts_with(&format!("{}:3:10: `fusion.plugin`: ", e.file.display())), "{e}");
}

#[test]
fn a_parameter_of_the_wrong_type_points_at_its_line() {
    let e = load_error("type.toml", "[fusion]\nplugin = \"avg_ce\"\n\n[fusion.params]\ntau = \"big\"\n");
    assert_eq!((e.line, e.key.as_str()), (5, "fusion.params.tau"));
    assert!(
        e.message.contains("plugin `avg_ce`: parameter `tau` expects float >= 0.000001, found string \"big\""),
        "{e}"
    );
}

#[test]
fn an_unknown_parameter_gets_the_nearest_one() {
    let e = load_error("param.toml", "[fusion]\nplugin = \"min_ce\"\nparams = { granularty = \"token\" }\n");
    assert_eq!((e.line, e.key.as_str()), (3, "fusion.params.granularty"));
    assert!(e.message.contains("unknown parameter `granularty`; did you mean `granularity`?"), "{e}");
}

#[test]
fn unknown_keys_get_the_nearest_one() {
    let e = load_error("key.toml", "[fusion]\nplugn = \"min_ce\"\n");
    assert_eq!((e.line, e.key.as_str()), (2, "fusion.plugn"));
    assert!(e.message.contains("unknown key in [fusion]; did you mean `plugin`?"), "{e}");

    let e = load_error("section.toml", "[fusoin]\nplugin = \"min_ce\"\n");
    assert_eq!((e.line, e.key.as_str()), (1, "fusoin"));
    assert!(e.message.contains("did you mean `fusion`?"), "{e}");
}

#[test]
fn a_missing_plugin_file_in_a_config_points_at_the_plugin_key() {
    let e = load_error("missing.toml", "[fusion]\nplugin = { wasm = \"plugins/nowhere.wasm\" }\n");
    assert_eq!((e.line, e.key.as_str()), (2, "fusion.plugin"));
    assert!(e.message.contains("nowhere.wasm not found"), "{e}");
}

#[test]
fn toml_syntax_errors_have_a_line() {
    let e = load_error("syntax.toml", "[fusion]\nplugin = \"min_ce\n");
    assert_eq!(e.line, 2);
}

#[test]
fn sandbox_limits_are_read_and_checked() {
    let config = Config::load(&write_config(
        "sandbox.toml",
        "[sandbox]\ndeadline_secs = 2.5\nmemory_mib = 128\ncache = false\n",
    ))
    .unwrap();
    assert_eq!(config.sandbox.deadline, std::time::Duration::from_millis(2500));
    assert_eq!(config.sandbox.memory_bytes, 128 << 20);
    assert!(config.sandbox.cache_dir.is_none());
    let e = Config::load(&write_config("sandbox-bad.toml", "[sandbox]\nmemory_mib = \"lots\"\n")).unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (2, "sandbox.memory_mib"));
    assert!(e.message.contains("expected an integer, found string"), "{e}");
}

/// The config is read by serde: a value of the wrong type, an unknown choice and an
/// unknown key each point at their key in the words of a config error.
#[test]
fn serde_errors_point_at_their_key() {
    for (text, line, key, says) in [
        ("[train]\nsteps = \"4\"\n", 2, "train.steps", "expected an integer, found string"),
        (
            "[train]\ndecay = \"cosin\"\n",
            2,
            "train.decay",
            "`cosin` is not one of constant, linear, cosine; did you mean `cosine`?",
        ),
        ("[run]\n\ndtype = \"f64\"\n", 3, "run.dtype", "`f64` is not one of f32, bf16, f16"),
        ("[data]\ncorpus = 3\n", 2, "data.corpus", "expected a string or an array of strings"),
        ("[fusion]\nplugin = 3\n", 2, "fusion.plugin", "expected a plugin name or { wasm"),
        (
            "[[sources]]\nmodel = \"a\"\nmodle = \"b\"\n",
            3,
            "sources.0.modle",
            "unknown key in [sources.0]; did you mean `model`?",
        ),
        ("[eval.sets]\nm = 3\n", 2, "eval.sets.m", "expected a string, found integer"),
    ] {
        let e = load_error("serde.toml", text);
        assert_eq!((e.line, e.key.as_str()), (line, key), "{e}");
        assert!(e.message.contains(says), "{e}");
    }
}
