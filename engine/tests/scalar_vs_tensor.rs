//! The scalar engine as the tensor engine's oracle: random small graphs built in both give the
//! same values and the same gradients.
//!
//! A graph is a random program over vectors of length N: leaves x, y (N) and W (N, N) are
//! trainable; each instruction applies an op to earlier results; the loss reduces the last one.
//! The tensor side runs the real kernels in f32, the scalar side composes each op from
//! micrograd primitives in f64, so agreement checks every forward kernel and backward rule the
//! program used.
use femtochat_engine::scalar::{self, Value};
use femtochat_engine::{RMSNORM_EPS, Reduction, Tensor};
use proptest::prelude::*;

const N: usize = 5;

#[derive(Clone, Debug)]
enum Instr {
    Add(usize, usize),
    Sub(usize, usize),
    Mul(usize, usize),
    Scale(usize, f32),
    Tanh(usize),
    Sigmoid(usize),
    Relu2(usize),
    Softmax(usize),
    LogSoftmax(usize),
    RmsNorm(usize),
    Linear(usize),
}

#[derive(Clone, Debug)]
enum Loss {
    Sum,
    Mean,
    CrossEntropy(usize),
}

fn instr() -> impl Strategy<Value = Instr> {
    let i = 0..64usize;
    prop_oneof![
        (i.clone(), i.clone()).prop_map(|(a, b)| Instr::Add(a, b)),
        (i.clone(), i.clone()).prop_map(|(a, b)| Instr::Sub(a, b)),
        (i.clone(), i.clone()).prop_map(|(a, b)| Instr::Mul(a, b)),
        (i.clone(), -2.0f32..2.0).prop_map(|(a, s)| Instr::Scale(a, s)),
        i.clone().prop_map(Instr::Tanh),
        i.clone().prop_map(Instr::Sigmoid),
        i.clone().prop_map(Instr::Relu2),
        i.clone().prop_map(Instr::Softmax),
        i.clone().prop_map(Instr::LogSoftmax),
        i.clone().prop_map(Instr::RmsNorm),
        i.prop_map(Instr::Linear),
    ]
}

fn loss() -> impl Strategy<Value = Loss> {
    prop_oneof![Just(Loss::Sum), Just(Loss::Mean), (0..N).prop_map(Loss::CrossEntropy)]
}

/// The program on tensors; returns the loss and the three leaves.
fn run_tensor(
    x: &[f32],
    y: &[f32],
    w: &[f32],
    prog: &[Instr],
    loss: &Loss,
) -> (f32, Vec<Vec<f32>>) {
    let xt = Tensor::param(x.to_vec(), &[N]).unwrap();
    let yt = Tensor::param(y.to_vec(), &[N]).unwrap();
    let wt = Tensor::param(w.to_vec(), &[N, N]).unwrap();
    let mut vals = vec![xt.clone(), yt.clone()];
    for ins in prog {
        let at = |i: usize| vals[i % vals.len()].clone();
        let out = match *ins {
            Instr::Add(a, b) => at(a).add(&at(b)),
            Instr::Sub(a, b) => at(a).sub(&at(b)),
            Instr::Mul(a, b) => at(a).mul(&at(b)),
            Instr::Scale(a, s) => at(a).scale(s),
            Instr::Tanh(a) => at(a).tanh(),
            Instr::Sigmoid(a) => at(a).sigmoid(),
            Instr::Relu2(a) => at(a).relu2(),
            Instr::Softmax(a) => at(a).softmax(),
            Instr::LogSoftmax(a) => at(a).log_softmax(),
            Instr::RmsNorm(a) => at(a).rmsnorm(RMSNORM_EPS),
            Instr::Linear(a) => at(a).linear(&wt),
        };
        vals.push(out.unwrap());
    }
    let last = vals.last().unwrap();
    let l = match loss {
        Loss::Sum => last.sum(),
        Loss::Mean => last.mean(),
        Loss::CrossEntropy(t) => {
            last.reshape(&[1, N]).unwrap().cross_entropy(&[*t as i32], Reduction::Mean)
        }
    }
    .unwrap();
    let g = l.backward().unwrap();
    let grad = |t: &Tensor| g.get(t).map_or(vec![0.0; t.numel()], |g| g.to_vec());
    (l.item().unwrap(), vec![grad(&xt), grad(&yt), grad(&wt)])
}

/// The same program on scalars.
fn run_scalar(
    x: &[f32],
    y: &[f32],
    w: &[f32],
    prog: &[Instr],
    loss: &Loss,
) -> (f64, Vec<Vec<f64>>) {
    let leaves = |v: &[f32]| -> Vec<Value> { v.iter().map(|&a| Value::new(a as f64)).collect() };
    let (xs, ys, ws) = (leaves(x), leaves(y), leaves(w));
    let wrows: Vec<Vec<Value>> = ws.chunks(N).map(|r| r.to_vec()).collect();
    let mut vals = vec![xs.clone(), ys.clone()];
    let map =
        |v: &[Value], f: &dyn Fn(&Value) -> Value| -> Vec<Value> { v.iter().map(f).collect() };
    for ins in prog {
        let at = |i: usize| vals[i % vals.len()].clone();
        let zip = |a: usize, b: usize, f: &dyn Fn(&Value, &Value) -> Value| -> Vec<Value> {
            at(a).iter().zip(&at(b)).map(|(p, q)| f(p, q)).collect()
        };
        let out = match *ins {
            Instr::Add(a, b) => zip(a, b, &|p, q| p.add(q)),
            Instr::Sub(a, b) => zip(a, b, &|p, q| p.sub(q)),
            Instr::Mul(a, b) => zip(a, b, &|p, q| p.mul(q)),
            Instr::Scale(a, s) => map(&at(a), &|p| p.scale(s as f64)),
            Instr::Tanh(a) => map(&at(a), &|p| p.tanh()),
            Instr::Sigmoid(a) => map(&at(a), &|p| p.sigmoid()),
            Instr::Relu2(a) => map(&at(a), &|p| p.relu().pow(2.0)),
            Instr::Softmax(a) => scalar::softmax(&at(a)),
            Instr::LogSoftmax(a) => scalar::log_softmax(&at(a)),
            Instr::RmsNorm(a) => scalar::rmsnorm(&at(a), RMSNORM_EPS as f64),
            Instr::Linear(a) => scalar::linear(&at(a), &wrows),
        };
        vals.push(out);
    }
    let last = vals.last().unwrap();
    let l = match loss {
        Loss::Sum => Value::sum(last),
        Loss::Mean => scalar::mean(last),
        Loss::CrossEntropy(t) => scalar::cross_entropy(last, *t),
    };
    l.backward();
    let grads = |v: &[Value]| v.iter().map(Value::grad).collect();
    (l.data(), vec![grads(&xs), grads(&ys), grads(&ws)])
}

/// f32 against f64, relative to the size of what is compared.
fn close(got: f32, want: f64, scale: f64) -> bool {
    (got as f64 - want).abs() <= 2e-4 * (1.0 + scale) && got.is_finite()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_graphs_agree(
        x in prop::collection::vec(-1.5f32..1.5, N),
        y in prop::collection::vec(-1.5f32..1.5, N),
        w in prop::collection::vec(-0.6f32..0.6, N * N),
        prog in prop::collection::vec(instr(), 1..12),
        loss in loss(),
    ) {
        let (lt, gt) = run_tensor(&x, &y, &w, &prog, &loss);
        let (ls, gs) = run_scalar(&x, &y, &w, &prog, &loss);
        prop_assume!(ls.is_finite() && ls.abs() < 1e4);
        prop_assert!(close(lt, ls, ls.abs()), "loss {} vs {}", lt, ls);
        for (name, (t, s)) in ["x", "y", "W"].iter().zip(gt.iter().zip(&gs)) {
            let scale = s.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            prop_assume!(scale < 1e4);
            for (i, (a, b)) in t.iter().zip(s).enumerate() {
                prop_assert!(close(*a, *b, scale), "d{}[{}]: tensor {} scalar {}", name, i, a, b);
            }
        }
    }
}
