//! Checkpoints: bit-exact round trips, nanochat state dicts loading as-is, a clear error of its
//! own for each kind of bad file, and no checkpoint written from a failed GPU read.
use std::path::Path;

use femtochat::engine::{Ids, MuonAdamW, Reduction};
use femtochat::model::checkpoint::{
    load_model, load_optimizer, load_state_dict, save_model, save_optimizer,
};
use femtochat::model::optim::{OptimizerConfig, param_groups};
use femtochat::model::parity::Fixture;
use femtochat::model::{GPTConfig, Gpt, ModelError};

fn config() -> GPTConfig {
    GPTConfig {
        sequence_len: 16,
        vocab_size: 50,
        n_layer: 2,
        n_head: 2,
        n_kv_head: 2,
        n_embd: 32,
        window_pattern: "L".into(),
    }
}

fn saved(dir: &Path) -> (Gpt, std::path::PathBuf) {
    let gpt = Gpt::init(config(), 9).unwrap();
    let path = dir.join("model.safetensors");
    save_model(&path, &gpt, &serde_json::json!({"step": 3})).unwrap();
    (gpt, path)
}

#[test]
fn model_round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (gpt, path) = saved(dir.path());
    let (back, meta) = load_model(&path).unwrap();
    assert_eq!(meta.config, config());
    assert_eq!(meta.meta["step"], 3);
    for (n, t) in gpt.params().iter() {
        let a: Vec<u32> = t.to_vec().iter().map(|v| v.to_bits()).collect();
        let b: Vec<u32> =
            back.params().get(n).unwrap().to_vec().iter().map(|v| v.to_bits()).collect();
        assert_eq!(a, b, "{n}");
    }
    // No temp file is left behind.
    let names: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn optimizer_round_trip_continues_identically() {
    let dir = tempfile::tempdir().unwrap();
    let gpt = Gpt::init(config(), 1).unwrap();
    let groups = param_groups(gpt.config(), &OptimizerConfig::default());
    let mut opt = MuonAdamW::new(groups.clone(), gpt.params()).unwrap();
    let idx = Ids::new((0..32).map(|i| i % 50).collect(), &[2, 16]).unwrap();
    let targets: Vec<i32> = (0..32).map(|i| i * 7 % 50).collect();
    let step = |gpt: &Gpt, opt: &mut MuonAdamW| {
        let loss = gpt.loss(&idx, &targets, Reduction::Mean).unwrap();
        opt.step(gpt.params(), &loss.backward().unwrap()).unwrap();
    };
    step(&gpt, &mut opt);
    save_model(&dir.path().join("m.safetensors"), &gpt, &serde_json::Value::Null).unwrap();
    save_optimizer(&dir.path().join("o.safetensors"), &opt).unwrap();
    step(&gpt, &mut opt);

    let (resumed, _) = load_model(&dir.path().join("m.safetensors")).unwrap();
    let mut opt2 = MuonAdamW::new(groups, resumed.params()).unwrap();
    load_optimizer(&dir.path().join("o.safetensors"), &mut opt2).unwrap();
    assert_eq!(opt2.steps_taken(), 1);
    step(&resumed, &mut opt2);
    for (n, t) in gpt.params().iter() {
        assert_eq!(t.to_vec(), resumed.params().get(n).unwrap().to_vec(), "{n} after resume");
    }
}

/// Named tensors as (name, shape, values).
type State = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The odd_shapes fixture's config and `param.*` tensors: a nanochat state dict.
fn nanochat_state() -> (GPTConfig, State) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/odd_shapes.safetensors");
    let fx = Fixture::load(&path).unwrap();
    let gpt = fx.model().unwrap();
    let state =
        gpt.params().iter().map(|(n, t)| (n.to_string(), t.shape().to_vec(), t.to_vec())).collect();
    (fx.config.clone(), state)
}

/// The fixture's `param.*` tensors are a nanochat state dict exported to safetensors.
#[test]
fn nanochat_state_dict_loads_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let (config, state) = nanochat_state();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = state
        .into_iter()
        .map(|(n, s, d)| (n, s, d.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = bytes.iter().map(|(n, s, b)| {
        (
            n.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
        )
    });
    let path = dir.path().join("state.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let gpt = load_state_dict(&path, config).unwrap();
    assert_eq!(gpt.params().len(), 3 * 6 + 2 * 2 + 1 + 1 + 5);
}

#[test]
fn bad_files_each_get_their_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = saved(dir.path());
    let good = std::fs::read(&path).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };

    let cut = write("cut.safetensors", &good[..good.len() - 100]);
    assert!(
        matches!(load_model(&cut), Err(ModelError::Truncated { .. })),
        "{:?}",
        load_model(&cut).err()
    );
    let stub = write("stub.safetensors", &good[..4]);
    assert!(matches!(load_model(&stub), Err(ModelError::Truncated { .. })));

    let mut garbage = good.clone();
    garbage[8..40].copy_from_slice(&[b'#'; 32]);
    let garbage = write("garbage.safetensors", &garbage);
    let e = load_model(&garbage).unwrap_err();
    assert!(matches!(e, ModelError::Checkpoint { .. }) && e.to_string().contains("JSON"), "{e}");

    // Another config's weights: wrong shape.
    let other = Gpt::init(GPTConfig { n_embd: 64, ..config() }, 0).unwrap();
    let other_path = dir.path().join("other.safetensors");
    save_model(&other_path, &other, &serde_json::Value::Null).unwrap();
    let e = load_state_dict(&other_path, config()).unwrap_err();
    assert!(matches!(e, ModelError::ParamShape { .. }), "{e}");

    // A missing tensor and an unexpected one.
    let gpt = Gpt::init(config(), 0).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = gpt
        .params()
        .iter()
        .map(|(n, t)| {
            (
                n.to_string(),
                t.shape().to_vec(),
                t.to_vec().iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let write_dict = |name: &str, entries: &[(String, Vec<usize>, Vec<u8>)]| {
        let views = entries.iter().map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        });
        let p = dir.path().join(name);
        safetensors::serialize_to_file(views, None, &p).unwrap();
        p
    };
    let without = write_dict("without.safetensors", &bytes[1..]);
    let e = load_state_dict(&without, config()).unwrap_err();
    assert!(matches!(e, ModelError::MissingParam { ref name } if *name == bytes[0].0), "{e}");
    let mut extra = bytes.clone();
    extra.push(("transformer.h.9.attn.c_q.weight".into(), vec![1], vec![0; 4]));
    let extra = write_dict("extra.safetensors", &extra);
    let e = load_state_dict(&extra, config()).unwrap_err();
    assert!(matches!(e, ModelError::UnexpectedParam { .. }), "{e}");

    let missing = load_model(&dir.path().join("nope.safetensors")).unwrap_err();
    assert!(missing.to_string().contains("nope.safetensors"), "{missing}");
}

/// nanochat checkpoints are often bf16 (or f16): they load widened to f32 exactly, and a dtype
/// that is not a float is refused with its own error naming the tensor.
#[test]
fn half_precision_state_dicts_load_widened() {
    let dir = tempfile::tempdir().unwrap();
    let (config, state) = nanochat_state();

    type Narrow = fn(f32) -> ([u8; 2], f32);
    let bf16: Narrow = |x| {
        let h = half::bf16::from_f32(x);
        (h.to_le_bytes(), h.to_f32())
    };
    let f16: Narrow = |x| {
        let h = half::f16::from_f32(x);
        (h.to_le_bytes(), h.to_f32())
    };
    for (dtype, narrow) in [(safetensors::Dtype::BF16, bf16), (safetensors::Dtype::F16, f16)] {
        // (name, shape, encoded bytes, the f32 values those bytes decode to)
        let encoded: Vec<_> = state
            .iter()
            .map(|(n, s, d)| {
                let (raw, wide): (Vec<[u8; 2]>, Vec<f32>) = d.iter().map(|&x| narrow(x)).unzip();
                (n.clone(), s.clone(), raw.concat::<u8>(), wide)
            })
            .collect();
        let views = encoded.iter().map(|(n, s, raw, _)| {
            (n.clone(), safetensors::tensor::TensorView::new(dtype, s.clone(), raw).unwrap())
        });
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let gpt = load_state_dict(&path, config.clone()).unwrap();
        let params = gpt.params();
        assert_eq!(params.len(), encoded.len(), "{dtype:?}");
        for (name, _, _, wide) in &encoded {
            let got = params.iter().find(|(n, _)| n == name).map(|(_, t)| t.to_vec());
            let got = got.unwrap_or_else(|| panic!("{dtype:?}: {name} not loaded"));
            let same = got.iter().zip(wide).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{dtype:?}: {name} differs from its widened {dtype:?} values");
        }
    }

    // An integer tensor where a weight belongs.
    let (name, shape, data) = &state[0];
    let ints: Vec<u8> = data.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, shape.clone(), &ints)
        .unwrap();
    let path = dir.path().join("ints.safetensors");
    safetensors::serialize_to_file([(name.clone(), view)], None, &path).unwrap();
    let e = load_state_dict(&path, config).unwrap_err();
    assert!(matches!(e, ModelError::Dtype { name: ref n, .. } if n == name), "{e}");
}

/// A failed GPU read (injected: `fail_next_downloads`) makes `save_model` and `save_optimizer`
/// return the error and leaves the previous files untouched, with no temporary file behind:
/// never a checkpoint of NaNs. The one infallible read, `to_vec`, yields NaNs, not stale numbers.
#[test]
fn a_failed_gpu_read_is_an_error_and_keeps_the_previous_files() {
    use femtochat::engine::Device;
    use femtochat::kernels::gpu::fail_next_downloads;
    if let Err(e) = Device::Gpu.ensure_available() {
        assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "{e}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let gpt = Gpt::init(config(), 5).unwrap().to_device(Device::Gpu).unwrap();
    let mut opt =
        MuonAdamW::new(param_groups(gpt.config(), &OptimizerConfig::default()), gpt.params())
            .unwrap();
    let idx = Ids::new((0..32).map(|i| i % 50).collect(), &[2, 16]).unwrap();
    let targets: Vec<i32> = (0..32).map(|i| i * 3 % 50).collect();
    let step = |opt: &mut MuonAdamW| {
        let loss = gpt.loss(&idx, &targets, Reduction::Mean).unwrap();
        opt.step(gpt.params(), &loss.backward().unwrap()).unwrap();
    };
    step(&mut opt);
    let (m, o) = (dir.path().join("m.safetensors"), dir.path().join("o.safetensors"));
    save_model(&m, &gpt, &serde_json::json!({"step": 1})).unwrap();
    save_optimizer(&o, &opt).unwrap();
    let before = (std::fs::read(&m).unwrap(), std::fs::read(&o).unwrap());
    step(&mut opt);
    for n in [1, 3] {
        fail_next_downloads(n);
        let e = save_model(&m, &gpt, &serde_json::json!({"step": 2})).unwrap_err();
        assert!(e.to_string().contains("injected failure"), "{e}");
        fail_next_downloads(n);
        let e = save_optimizer(&o, &opt).unwrap_err();
        assert!(e.to_string().contains("injected failure"), "{e}");
    }
    fail_next_downloads(0);
    assert!(before == (std::fs::read(&m).unwrap(), std::fs::read(&o).unwrap()));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "a temporary file was left");
    let (_, p) = gpt.params().iter().next().unwrap();
    fail_next_downloads(1);
    assert!(p.to_vec().iter().all(|x| x.is_nan()));
    // Reads work again afterwards, and the next save succeeds.
    assert!(p.to_vec().iter().all(|x| x.is_finite()));
    save_model(&m, &gpt, &serde_json::json!({"step": 2})).unwrap();
}
