//! The micro models on the tensor engine (f32 kernels, CPU or GPU), op for op the model of
//! `scalar_impl.rs`, trained by the engine's AdamW (`MuonAdamW` with one AdamW group).
use std::collections::BTreeMap;

use anyhow::{Context, Result};
use femtochat_engine::{
    Device, GroupKind, Ids, MuonAdamW, ParamGroup, ParamStore, RMSNORM_EPS, Reduction, Tensor,
    no_grad,
};

use super::model::{AdamW, Kind, MicroConfig, MicroModel};

pub struct TensorModel {
    cfg: MicroConfig,
    params: ParamStore,
    opt: MuonAdamW,
    device: Device,
}

impl TensorModel {
    pub fn new(
        cfg: MicroConfig,
        init: &BTreeMap<String, Vec<f32>>,
        adamw: AdamW,
        device: Device,
    ) -> Result<Self> {
        let mut params = ParamStore::new();
        for (name, shape) in cfg.shapes() {
            let data = init.get(&name).with_context(|| format!("no initial value for `{name}`"))?;
            params.insert(name, Tensor::param(data.clone(), &shape)?);
        }
        let params = params.to_device(device)?;
        let group = ParamGroup {
            kind: GroupKind::AdamW {
                betas: (adamw.betas.0 as f32, adamw.betas.1 as f32),
                eps: adamw.eps as f32,
            },
            lr: 0.0,
            initial_lr: 0.0,
            weight_decay: adamw.weight_decay as f32,
            params: params.names().map(String::from).collect(),
        };
        let opt = MuonAdamW::new(vec![group], &params)?;
        Ok(TensorModel { cfg, params, opt, device })
    }

    fn p(&self, name: &str) -> Result<&Tensor> {
        Ok(self.params.get(name)?)
    }

    /// Logits (B, T, V) of ids (B, T).
    fn forward(&self, ids: &Ids) -> Result<Tensor> {
        let wte = self.p("wte")?;
        if self.cfg.kind == Kind::Bigram {
            return Ok(Tensor::embedding(wte, ids)?);
        }
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        let (c, nh, d) = (self.cfg.n_embd, self.cfg.n_head, self.cfg.head_dim());
        // (B, T, C) + (T, C)
        let mut x = Tensor::embedding(wte, ids)?.add(&self.p("wpe")?.narrow(0, 0, t)?)?;
        if self.cfg.input_rmsnorm {
            x = x.rmsnorm(RMSNORM_EPS)?;
        }
        for l in 0..self.cfg.depth {
            let w = |n: &str| self.p(&format!("h.{l}.{n}"));
            let a = x.rmsnorm(RMSNORM_EPS)?;
            let heads =
                |n: &str| -> Result<Tensor> { Ok(a.linear(w(n)?)?.reshape(&[b, t, nh, d])?) };
            let (q, k, v) = (heads("attn.wq")?, heads("attn.wk")?, heads("attn.wv")?);
            // causal, scale 1/sqrt(D): (B, T, H, D)
            let y = Tensor::attention(&q, &k, &v, usize::MAX, 0)?.reshape(&[b, t, c])?;
            x = x.add(&y.linear(w("attn.wo")?)?)?;
            let h = x.rmsnorm(RMSNORM_EPS)?.linear(w("mlp.fc")?)?.relu2()?;
            x = x.add(&h.linear(w("mlp.proj")?)?)?;
        }
        let head = if self.cfg.tie_lm_head { wte } else { self.p("lm_head")? };
        Ok(x.rmsnorm(RMSNORM_EPS)?.linear(head)?)
    }

    /// Per-position losses (B*T) or their mean, of windows of T + 1 ids.
    fn loss(&self, windows: &[Vec<u32>], reduction: Reduction) -> Result<Tensor> {
        let (b, t) = (windows.len(), windows.first().map_or(0, |w| w.len() - 1));
        let inputs: Vec<u32> = windows.iter().flat_map(|w| w[..t].iter().copied()).collect();
        let targets: Vec<i32> =
            windows.iter().flat_map(|w| w[1..].iter().map(|&x| x as i32)).collect();
        let logits = self.forward(&Ids::new(inputs, &[b, t])?)?;
        let v = self.cfg.vocab_size;
        Ok(logits.reshape(&[b * t, v])?.cross_entropy(&targets, reduction)?)
    }
}

impl MicroModel for TensorModel {
    fn engine(&self) -> (&'static str, String, String) {
        ("tensor", self.device.to_string(), self.device.describe())
    }

    fn train_step(&mut self, windows: &[Vec<u32>], lr: f64) -> Result<f64> {
        let loss = self.loss(windows, Reduction::Mean)?;
        let value = loss.item()? as f64;
        let grads = loss.backward()?;
        for g in self.opt.groups_mut() {
            g.lr = lr as f32;
        }
        self.opt.step(&self.params, &grads)?;
        Ok(value)
    }

    fn loss_sum(&mut self, windows: &[Vec<u32>]) -> Result<f64> {
        let _g = no_grad();
        let losses = self.loss(windows, Reduction::None)?.try_to_vec()?;
        Ok(losses.iter().map(|&l| l as f64).sum())
    }

    fn next_logits(&mut self, context: &[u32]) -> Result<Vec<f64>> {
        let _g = no_grad();
        let logits = self.forward(&Ids::new(context.to_vec(), &[1, context.len()])?)?;
        let v = self.cfg.vocab_size;
        let all = logits.try_to_vec()?;
        Ok(all[all.len() - v..].iter().map(|&x| x as f64).collect())
    }

    fn params(&self) -> Result<BTreeMap<String, Vec<f64>>> {
        self.params
            .iter()
            .map(|(n, t)| Ok((n.to_string(), t.try_to_vec()?.iter().map(|&x| x as f64).collect())))
            .collect()
    }
}
