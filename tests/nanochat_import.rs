//! Importing PyTorch nanochat's files without Python: tests/fixtures/nanochat_checkpoint was
//! written by nanochat's own code (see ../shared/fixtures/README.md and
//! tools/nanochat_fixtures.py for encode.jsonl, optim_check.json and bf16/).
use std::path::{Path, PathBuf};

use femtochat::engine::{Ids, MuonAdamW};
use femtochat::model::Gpt;
use femtochat::model::checkpoint::load_run;
use femtochat::model::generate::generate;
use femtochat::model::nanochat::{self, Source};
use femtochat::model::optim::{OptimizerConfig, param_groups};
use femtochat::model::parity::rel_err;
use femtochat::model::sampler::{Sampler, SamplingParams};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nanochat_checkpoint").join(rel)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The prompt logits within 1e-5 relative L2 and the 60 greedy tokens identical; returns the
/// logits' error.
fn check_against(gpt: &Gpt, expected: &serde_json::Value) -> f64 {
    let prompt = ids(&expected["prompt_ids"]);
    let logits = gpt.forward(&Ids::new(prompt.clone(), &[1, prompt.len()]).unwrap()).unwrap();
    let want: Vec<f32> = expected["prompt_logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
        .collect();
    let err = rel_err(&logits.to_vec(), &want);
    assert!(err < 1e-5, "prompt logits: relative L2 error {err:e}");
    let mut greedy =
        Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() }, 0).unwrap();
    let (got, _) = generate(gpt, &prompt, &mut greedy, 60, &[], |_| true).unwrap();
    assert_eq!(got, ids(&expected["greedy_ids"]));
    err
}

#[test]
fn imported_model_matches_nanochat() {
    let loc = nanochat::locate(&fixture(""), None, None, None).unwrap();
    assert_eq!((loc.source, loc.tag.as_str(), loc.step), (Source::Base, "d2", 30));
    let (gpt, meta) = nanochat::load_model(&loc).unwrap();
    assert_eq!(meta["model_config"]["window_pattern"], "SL");
    let expected = json(&fixture("expected.json"));
    let err = check_against(&gpt, &expected);
    println!("fp32 fixture: prompt logits relative L2 error {err:e}, 60 greedy tokens equal");
    let tok = nanochat::load_tokenizer(&fixture("tokenizer")).unwrap();
    let greedy = ids(&expected["greedy_ids"]);
    assert_eq!(tok.decode(&greedy).unwrap(), expected["greedy_text"].as_str().unwrap());
}

/// torch.compile'd bf16 training's layout: `_orig_mod.` keys, bf16 matrices next to fp32
/// scalars, and (on purpose) a transposed view and a view at a storage offset.
#[test]
fn bf16_compiled_checkpoint_imports() {
    let loc = nanochat::locate(&fixture("bf16"), Some(Source::Base), Some("d2"), Some(30)).unwrap();
    let (gpt, _) = nanochat::load_model(&loc).unwrap();
    let err = check_against(&gpt, &json(&fixture("bf16/expected.json")));
    println!("bf16 fixture: prompt logits relative L2 error {err:e}, 60 greedy tokens equal");
    // Every bf16 weight is the fp32 fixture's rounded to bf16.
    let (fp32, _) =
        nanochat::load_model(&nanochat::locate(&fixture(""), None, None, None).unwrap()).unwrap();
    for (name, t) in gpt.params().iter() {
        let want = fp32.params().get(name).unwrap().to_vec();
        let got = t.to_vec();
        let rounded: Vec<f32> = want.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        assert!(got == want || got == rounded, "{name}");
    }
}

/// The pickled tiktoken.Encoding's encode_ordinary and decode, through our tokenizer.
#[test]
fn tokenizer_encodes_like_the_pickled_tiktoken_encoding() {
    let tok = nanochat::load_tokenizer(&fixture("tokenizer")).unwrap();
    assert_eq!(tok.vocab_size(), 607);
    let text = std::fs::read_to_string(fixture("encode.jsonl")).unwrap();
    let mut n = 0;
    for line in text.lines() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(t) = case["text"].as_str() {
            assert_eq!(tok.encode(t), ids(&case["ids"]), "{t:?}");
        } else {
            assert_eq!(tok.decode(&ids(&case["ids"])).unwrap(), case["decoded"].as_str().unwrap());
        }
        n += 1;
    }
    assert!(n >= 15);
    nanochat::check_token_bytes(&fixture("tokenizer/token_bytes.pt"), &tok).unwrap();
}

/// Every buffer of nanochat's optimizer state lands under the name torch itself maps it to
/// (optim_check.json), and femtochat's MuonAdamW accepts the result.
#[test]
fn optimizer_state_maps_onto_femtochat_names() {
    let loc = nanochat::locate(&fixture(""), None, None, None).unwrap();
    let (config, _) = nanochat::read_meta(&loc).unwrap();
    let paths = loc.optimizer_paths();
    assert_eq!(paths.len(), 1);
    let imported = nanochat::optim::load(&paths, &config).unwrap();
    let check = json(&fixture("optim_check.json"));
    assert_eq!(imported.step, check["step"].as_u64().unwrap());
    let want = check.as_object().unwrap();
    assert_eq!(imported.buffers.len(), want.len() - 1, "every buffer, plus `step`");
    for (name, v) in &imported.buffers {
        let w = want[name].as_array().unwrap();
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let (s, first, last) =
            (w[0].as_f64().unwrap(), w[1].as_f64().unwrap(), w[2].as_f64().unwrap());
        assert!((sum - s).abs() <= 1e-6 * s.abs().max(1e-3), "{name}: sum {sum} vs {s}");
        assert_eq!((v[0], v[v.len() - 1]), (first as f32, last as f32), "{name}");
    }
    let gpt = Gpt::init(config.clone(), 0).unwrap();
    let mut opt =
        MuonAdamW::new(param_groups(&config, &OptimizerConfig::default()), gpt.params()).unwrap();
    opt.load_state_dict(imported.step, &imported.buffers).unwrap();
    // The groups' hyper-parameters as saved: the embedding lr is 0.3 x (128 / 768)^-0.5.
    let wte = imported.groups.iter().find(|g| g.params == ["transformer.wte.weight"]).unwrap();
    assert!((wte.initial_lr - 0.3 * (128f64 / 768.0).powf(-0.5)).abs() < 1e-9);
}

/// `serve --checkpoint NANOCHAT_DIR` goes through load_run, which recognises the layout at each
/// level (the base dir, a `<source>_checkpoints` dir, a tag dir).
#[test]
fn load_run_recognises_nanochat_directories() {
    for dir in [fixture(""), fixture("base_checkpoints"), fixture("base_checkpoints/d2")] {
        let (gpt, tok) = load_run(&dir, None).unwrap();
        assert_eq!((gpt.config().n_layer, tok.vocab_size()), (2, 607), "{}", dir.display());
    }
}

/// Missing pieces are errors that name what is missing, as for a femtochat run.
#[test]
fn missing_pieces_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let d2 = root.join("base_checkpoints/d2");
    std::fs::create_dir_all(&d2).unwrap();
    let err = load_run(root, None).unwrap_err().to_string();
    assert!(err.contains("no model_<step>.pt"), "{err}");
    std::fs::copy(fixture("base_checkpoints/d2/model_000030.pt"), d2.join("model_000030.pt"))
        .unwrap();
    let err = load_run(root, None).unwrap_err().to_string();
    assert!(err.contains("meta_000030.json"), "{err}");
    std::fs::copy(fixture("base_checkpoints/d2/meta_000030.json"), d2.join("meta_000030.json"))
        .unwrap();
    let err = load_run(root, None).unwrap_err().to_string();
    assert!(err.contains("tokenizer"), "{err}");
    // A tokenizer of another vocabulary: the same message as for a femtochat run.
    let other =
        femtochat::model::tokenizer::Tokenizer::train(&["some text for a tiny tokenizer"], 300)
            .unwrap();
    other.save(&root.join("tokenizer")).unwrap();
    let err = load_run(root, None).unwrap_err().to_string();
    assert!(err.contains("tokens but the model expects 607"), "{err}");
    let err = nanochat::locate(root, Some(Source::Sft), None, None).unwrap_err().to_string();
    assert!(err.contains("chatsft_checkpoints"), "{err}");
    let err = nanochat::locate(root, None, Some("d2"), Some(7)).unwrap_err().to_string();
    assert!(err.contains("model_000007.pt") && err.contains("[30]"), "{err}");
}

/// Export and import are inverses: the fixture's weights, optimizer state and tokenizer written
/// in nanochat's formats by our writers read back bit for bit by our readers (which the tests
/// above hold to nanochat's own files).
#[test]
fn export_round_trips_through_nanochat_formats() {
    let loc = nanochat::locate(&fixture(""), None, None, None).unwrap();
    let (config, _) = nanochat::read_meta(&loc).unwrap();
    let (gpt, _) = nanochat::load_model(&loc).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    let model_pt = tmp.path().join("model_000030.pt");
    nanochat::save_state_dict(&model_pt, &gpt).unwrap();
    let back = nanochat::load_state_dict(&model_pt, config.clone()).unwrap();
    let mut n = 0;
    for (name, t) in gpt.params().iter() {
        assert_eq!(back.params().get(name).unwrap().to_vec(), t.to_vec(), "{name}");
        n += 1;
    }
    assert_eq!(n, back.params().iter().count());

    let imported = nanochat::optim::load(&loc.optimizer_paths(), &config).unwrap();
    let optim_pt = tmp.path().join("optim_000030_rank0.pt");
    let groups = param_groups(&config, &OptimizerConfig::default());
    nanochat::optim::save(&optim_pt, &config, imported.step, &imported.buffers, &groups).unwrap();
    let again = nanochat::optim::load(std::slice::from_ref(&optim_pt), &config).unwrap();
    assert_eq!((again.step, again.ranks), (imported.step, 1));
    assert_eq!(again.buffers, imported.buffers);
    assert_eq!(again.groups.len(), imported.groups.len());
    // A buffer missing from the state is refused before anything is written.
    let mut short = imported.buffers.clone();
    let first = short.keys().next().unwrap().clone();
    short.remove(&first);
    let err = nanochat::optim::save(&tmp.path().join("bad.pt"), &config, 1, &short, &groups)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&first), "{err}");

    let tok = nanochat::load_tokenizer(&fixture("tokenizer")).unwrap();
    let tok_dir = tmp.path().join("tokenizer");
    nanochat::save_tokenizer(&tok, &tok_dir).unwrap();
    let tok_back = nanochat::load_tokenizer(&tok_dir).unwrap();
    assert_eq!(tok_back.vocab_size(), tok.vocab_size());
    nanochat::check_token_bytes(&tok_dir.join("token_bytes.pt"), &tok).unwrap();
    let text = "Hello, world! <|bos|> 12345 héllo";
    assert_eq!(tok_back.encode(text), tok.encode(text));
}

/// By hand (benches/nanochat_export_check.sh): a femtochat run exported to FEMTOCHAT_NANOCHAT_DIR,
/// where nanochat's own build_model wrote expected.json (prompt logits, 60 greedy tokens). Our
/// model (the run itself, FEMTOCHAT_RUN_DIR, and the export imported back) gives the same.
#[test]
#[ignore = "needs torch; run by benches/nanochat_export_check.sh"]
fn external_export_matches_nanochat() {
    let (Some(nc), Some(run)) =
        (std::env::var_os("FEMTOCHAT_NANOCHAT_DIR"), std::env::var_os("FEMTOCHAT_RUN_DIR"))
    else {
        panic!("set FEMTOCHAT_NANOCHAT_DIR and FEMTOCHAT_RUN_DIR");
    };
    let expected = json(&Path::new(&nc).join("expected.json"));
    let (ours, tok) = load_run(Path::new(&run), None).unwrap();
    let run_err = check_against(&ours, &expected);
    let (back, _) =
        nanochat::load_model(&nanochat::locate(Path::new(&nc), None, None, None).unwrap()).unwrap();
    let import_err = check_against(&back, &expected);
    println!(
        "{}",
        serde_json::json!({
            "run": run.to_string_lossy(), "nanochat_dir": nc.to_string_lossy(),
            "logits_rel_l2_run": run_err, "logits_rel_l2_reimported": import_err,
            "greedy_tokens_equal": 60, "greedy_text": tok.decode(&ids(&expected["greedy_ids"])).unwrap(),
        })
    );
}
