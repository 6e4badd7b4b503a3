//! The micro models on the scalar engine (f64, one graph node per number): the readable
//! reference. One training step builds the graph of every position of every window, averages
//! the losses, back-propagates and applies `ScalarAdamW`.
use std::collections::BTreeMap;

use anyhow::{Result, bail};
use femtochat_engine::RMSNORM_EPS;
use femtochat_engine::scalar::{self, ScalarAdamW, Value};

use super::model::{AdamW, Kind, MicroConfig, MicroModel};

pub struct ScalarModel {
    cfg: MicroConfig,
    /// Name -> rows (each of the last dim), in name order.
    params: BTreeMap<String, Vec<Vec<Value>>>,
    opt: ScalarAdamW,
}

impl ScalarModel {
    pub fn new(cfg: MicroConfig, init: &BTreeMap<String, Vec<f32>>, adamw: AdamW) -> Result<Self> {
        let mut params = BTreeMap::new();
        for (name, shape) in cfg.shapes() {
            let Some(data) = init.get(&name) else { bail!("no initial value for `{name}`") };
            let cols = *shape.last().unwrap_or(&1);
            let rows = data.chunks(cols).map(|r| r.iter().map(|&x| Value::new(x as f64)).collect());
            params.insert(name, rows.collect());
        }
        let n = cfg.num_params();
        let opt = ScalarAdamW::new(n, adamw.betas, adamw.eps, adamw.weight_decay);
        Ok(ScalarModel { cfg, params, opt })
    }

    fn p(&self, name: &str) -> &[Vec<Value>] {
        self.params.get(name).map_or(&[], Vec::as_slice)
    }

    /// Logits (V) at every position of `ids` (T <= block_size).
    fn forward(&self, ids: &[u32]) -> Vec<Vec<Value>> {
        let wte = self.p("wte");
        if self.cfg.kind == Kind::Bigram {
            return ids.iter().map(|&i| wte[i as usize].clone()).collect();
        }
        let (c, d) = (self.cfg.n_embd, self.cfg.head_dim());
        let wpe = self.p("wpe");
        let mut xs: Vec<Vec<Value>> = ids
            .iter()
            .enumerate()
            .map(|(t, &i)| {
                let e: Vec<Value> =
                    wte[i as usize].iter().zip(&wpe[t]).map(|(a, b)| a.add(b)).collect();
                if self.cfg.input_rmsnorm { norm(&e) } else { e }
            })
            .collect();
        let scale = 1.0 / (d as f64).sqrt();
        for l in 0..self.cfg.depth {
            let w = |n: &str| self.p(&format!("h.{l}.{n}"));
            // attention: every position attends to itself and the ones before it
            let a: Vec<Vec<Value>> = xs.iter().map(|x| norm(x)).collect();
            let q: Vec<Vec<Value>> = a.iter().map(|x| scalar::linear(x, w("attn.wq"))).collect();
            let k: Vec<Vec<Value>> = a.iter().map(|x| scalar::linear(x, w("attn.wk"))).collect();
            let v: Vec<Vec<Value>> = a.iter().map(|x| scalar::linear(x, w("attn.wv"))).collect();
            for t in 0..xs.len() {
                let mut y = Vec::with_capacity(c);
                for h in (0..c).step_by(d) {
                    let scores: Vec<Value> = (0..=t)
                        .map(|j| scalar::dot(&q[t][h..h + d], &k[j][h..h + d]).scale(scale))
                        .collect();
                    let p = scalar::softmax(&scores);
                    for e in h..h + d {
                        let terms: Vec<Value> =
                            p.iter().zip(&v).map(|(pj, vj)| pj.mul(&vj[e])).collect();
                        y.push(Value::sum(&terms));
                    }
                }
                let out = scalar::linear(&y, w("attn.wo"));
                xs[t] = add(&xs[t], &out);
            }
            for x in xs.iter_mut() {
                let h: Vec<Value> = scalar::linear(&norm(x), w("mlp.fc"))
                    .iter()
                    .map(|u| u.relu().pow(2.0))
                    .collect();
                *x = add(x, &scalar::linear(&h, w("mlp.proj")));
            }
        }
        let head = if self.cfg.tie_lm_head { wte } else { self.p("lm_head") };
        xs.iter().map(|x| scalar::linear(&norm(x), head)).collect()
    }

    /// Per-position losses of every window.
    fn losses(&self, windows: &[Vec<u32>]) -> Vec<Value> {
        let mut out = Vec::new();
        for w in windows {
            let (inputs, targets) = (&w[..w.len() - 1], &w[1..]);
            for (logits, &t) in self.forward(inputs).iter().zip(targets) {
                out.push(scalar::cross_entropy(logits, t as usize));
            }
        }
        out
    }
}

fn norm(x: &[Value]) -> Vec<Value> {
    scalar::rmsnorm(x, RMSNORM_EPS as f64)
}

fn add(a: &[Value], b: &[Value]) -> Vec<Value> {
    a.iter().zip(b).map(|(x, y)| x.add(y)).collect()
}

impl MicroModel for ScalarModel {
    fn engine(&self) -> (&'static str, String, String) {
        ("scalar", "cpu".into(), "scalar f64 (one thread)".into())
    }

    fn train_step(&mut self, windows: &[Vec<u32>], lr: f64) -> Result<f64> {
        let loss = scalar::mean(&self.losses(windows));
        loss.backward();
        let flat: Vec<Value> = self.params.values().flatten().flatten().cloned().collect();
        self.opt.step(&flat, lr);
        Ok(loss.data())
    }

    fn loss_sum(&mut self, windows: &[Vec<u32>]) -> Result<f64> {
        Ok(self.losses(windows).iter().map(Value::data).sum())
    }

    fn next_logits(&mut self, context: &[u32]) -> Result<Vec<f64>> {
        let logits = self.forward(context);
        Ok(logits.last().map(|l| l.iter().map(Value::data).collect()).unwrap_or_default())
    }

    fn params(&self) -> Result<BTreeMap<String, Vec<f64>>> {
        Ok(self
            .params
            .iter()
            .map(|(n, rows)| (n.clone(), rows.iter().flatten().map(Value::data).collect()))
            .collect())
    }
}
