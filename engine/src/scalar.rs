//! Scalar autograd over f64, after micrograd: every number is a node of the graph, every op
//! records its inputs, and `backward` walks the graph in reverse topological order applying the
//! chain rule one scalar at a time.
//!
//! It is the tensor engine's opposite in every way that matters for trust: no kernels, no
//! buffers, no broadcasting, f64 throughout, each derivative a one-line rule. That makes it the
//! oracle for the tensor engine (random graphs built in both must agree, see
//! `engine/tests/scalar_vs_tensor.rs`) and a readable reference for small models (`train micro
//! --mode scalar`). It is single-threaded (`Rc`) and slow: about 10^6 nodes a second.
//!
//! Primitives: `add`, `mul`, `pow`, `exp`, `log`, `tanh`, `relu` and an n-ary `sum`; everything
//! else (`sub`, `div`, `sigmoid`, `softmax`, `cross_entropy`, `rmsnorm`, `linear`) is composed
//! from them, so its gradient needs no rule of its own.
use std::cell::Cell;
use std::collections::HashSet;
use std::rc::Rc;

/// What a node computed from, with what its backward rule needs.
enum ScalarOp {
    Leaf,
    Add(Value, Value),
    Mul(Value, Value),
    Pow(Value, f64),
    Exp(Value),
    Log(Value),
    Tanh(Value),
    Relu(Value),
    Sum(Vec<Value>),
}

struct Node {
    data: Cell<f64>,
    grad: Cell<f64>,
    op: ScalarOp,
}

/// One scalar of a graph; cheap to clone (an `Rc`). Not `Send`: a graph lives on one thread.
#[derive(Clone)]
pub struct Value(Rc<Node>);

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Value(data={}, grad={})", self.data(), self.grad())
    }
}

// A long chain (a running sum, a deep model) would overflow the stack if dropped recursively,
// so a node we hold the last reference to hands its inputs to an explicit stack instead.
impl Drop for Node {
    fn drop(&mut self) {
        let mut pending = take_inputs(&mut self.op);
        while let Some(v) = pending.pop() {
            if let Ok(mut node) = Rc::try_unwrap(v.0) {
                pending.extend(take_inputs(&mut node.op));
            }
        }
    }
}

fn take_inputs(op: &mut ScalarOp) -> Vec<Value> {
    match std::mem::replace(op, ScalarOp::Leaf) {
        ScalarOp::Leaf => vec![],
        ScalarOp::Add(a, b) | ScalarOp::Mul(a, b) => vec![a, b],
        ScalarOp::Pow(a, _)
        | ScalarOp::Exp(a)
        | ScalarOp::Log(a)
        | ScalarOp::Tanh(a)
        | ScalarOp::Relu(a) => vec![a],
        ScalarOp::Sum(xs) => xs,
    }
}

impl Value {
    /// A leaf: a parameter or an input.
    pub fn new(data: f64) -> Value {
        Value::from_op(data, ScalarOp::Leaf)
    }

    fn from_op(data: f64, op: ScalarOp) -> Value {
        Value(Rc::new(Node { data: Cell::new(data), grad: Cell::new(0.0), op }))
    }

    pub fn data(&self) -> f64 {
        self.0.data.get()
    }

    /// d root / d self after the last `backward` of a graph containing this value.
    pub fn grad(&self) -> f64 {
        self.0.grad.get()
    }

    /// Overwrite a leaf's value (optimizer updates). The graphs built from it keep their
    /// forward values; build a new graph to see the change.
    pub fn set_data(&self, x: f64) {
        self.0.data.set(x);
    }

    pub fn add(&self, o: &Value) -> Value {
        Value::from_op(self.data() + o.data(), ScalarOp::Add(self.clone(), o.clone()))
    }

    pub fn mul(&self, o: &Value) -> Value {
        Value::from_op(self.data() * o.data(), ScalarOp::Mul(self.clone(), o.clone()))
    }

    /// self^k for a constant exponent.
    pub fn pow(&self, k: f64) -> Value {
        Value::from_op(self.data().powf(k), ScalarOp::Pow(self.clone(), k))
    }

    pub fn exp(&self) -> Value {
        Value::from_op(self.data().exp(), ScalarOp::Exp(self.clone()))
    }

    /// Natural log (NaN below 0, -inf at 0, as f64).
    pub fn log(&self) -> Value {
        Value::from_op(self.data().ln(), ScalarOp::Log(self.clone()))
    }

    pub fn tanh(&self) -> Value {
        Value::from_op(self.data().tanh(), ScalarOp::Tanh(self.clone()))
    }

    pub fn relu(&self) -> Value {
        Value::from_op(self.data().max(0.0), ScalarOp::Relu(self.clone()))
    }

    /// Sum of many values as one node (a chain of `add`s would be as deep as it is long).
    pub fn sum(xs: &[Value]) -> Value {
        let s = xs.iter().map(Value::data).sum();
        Value::from_op(s, ScalarOp::Sum(xs.to_vec()))
    }

    pub fn add_const(&self, c: f64) -> Value {
        self.add(&Value::new(c))
    }

    pub fn scale(&self, c: f64) -> Value {
        self.mul(&Value::new(c))
    }

    pub fn neg(&self) -> Value {
        self.scale(-1.0)
    }

    pub fn sub(&self, o: &Value) -> Value {
        self.add(&o.neg())
    }

    pub fn div(&self, o: &Value) -> Value {
        self.mul(&o.pow(-1.0))
    }

    /// 1 / (1 + e^-x)
    pub fn sigmoid(&self) -> Value {
        self.neg().exp().add_const(1.0).pow(-1.0)
    }

    /// Set every gradient of the graph to d self / d node (self must be the root scalar, e.g.
    /// a loss). Gradients from an earlier backward are overwritten, not accumulated.
    pub fn backward(&self) {
        let order = self.topo_order();
        for v in &order {
            v.0.grad.set(0.0);
        }
        self.0.grad.set(1.0);
        for v in order.iter().rev() {
            let g = v.grad();
            let acc = |x: &Value, d: f64| x.0.grad.set(x.grad() + d);
            match &v.0.op {
                ScalarOp::Leaf => {}
                // d(a + b) = da + db
                ScalarOp::Add(a, b) => {
                    acc(a, g);
                    acc(b, g);
                }
                // d(a b) = b da + a db
                ScalarOp::Mul(a, b) => {
                    acc(a, g * b.data());
                    acc(b, g * a.data());
                }
                // d x^k = k x^(k-1)
                ScalarOp::Pow(a, k) => acc(a, g * k * a.data().powf(k - 1.0)),
                // d e^x = e^x
                ScalarOp::Exp(a) => acc(a, g * v.data()),
                // d ln x = 1 / x
                ScalarOp::Log(a) => acc(a, g / a.data()),
                // d tanh = 1 - tanh^2
                ScalarOp::Tanh(a) => acc(a, g * (1.0 - v.data() * v.data())),
                // d relu = [x > 0]
                ScalarOp::Relu(a) => acc(a, if a.data() > 0.0 { g } else { 0.0 }),
                // d sum = 1 for every term
                ScalarOp::Sum(xs) => xs.iter().for_each(|x| acc(x, g)),
            }
        }
    }

    /// Every node reachable from self, each after all of its inputs (iterative DFS, so graph
    /// depth is unbounded).
    fn topo_order(&self) -> Vec<Value> {
        let mut order = Vec::new();
        let mut seen: HashSet<*const Node> = HashSet::new();
        let mut stack = vec![(self.clone(), false)];
        while let Some((v, expanded)) = stack.pop() {
            if expanded {
                order.push(v);
                continue;
            }
            if !seen.insert(Rc::as_ptr(&v.0)) {
                continue;
            }
            stack.push((v.clone(), true));
            let inputs: Vec<Value> = match &v.0.op {
                ScalarOp::Leaf => vec![],
                ScalarOp::Add(a, b) | ScalarOp::Mul(a, b) => vec![a.clone(), b.clone()],
                ScalarOp::Pow(a, _)
                | ScalarOp::Exp(a)
                | ScalarOp::Log(a)
                | ScalarOp::Tanh(a)
                | ScalarOp::Relu(a) => vec![a.clone()],
                ScalarOp::Sum(xs) => xs.clone(),
            };
            for i in inputs {
                if !seen.contains(&Rc::as_ptr(&i.0)) {
                    stack.push((i.clone(), false));
                }
            }
        }
        order
    }
}

/// Leaves from numbers.
pub fn values(xs: &[f64]) -> Vec<Value> {
    xs.iter().map(|&x| Value::new(x)).collect()
}

/// sum_i a_i b_i
pub fn dot(a: &[Value], b: &[Value]) -> Value {
    let terms: Vec<Value> = a.iter().zip(b).map(|(x, y)| x.mul(y)).collect();
    Value::sum(&terms)
}

/// x W^T for x (K) and w (N rows of K): the tensor engine's `linear` on one row.
pub fn linear(x: &[Value], w: &[Vec<Value>]) -> Vec<Value> {
    w.iter().map(|row| dot(x, row)).collect()
}

/// Softmax of a row. The max is subtracted as a constant: softmax is invariant to it, so it
/// changes no gradient, and it keeps exp from overflowing.
pub fn softmax(x: &[Value]) -> Vec<Value> {
    let m = x.iter().map(Value::data).fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<Value> = x.iter().map(|v| v.add_const(-m).exp()).collect();
    let inv = Value::sum(&e).pow(-1.0);
    e.iter().map(|v| v.mul(&inv)).collect()
}

/// log softmax of a row: x - m - log(sum e^(x - m)).
pub fn log_softmax(x: &[Value]) -> Vec<Value> {
    let m = x.iter().map(Value::data).fold(f64::NEG_INFINITY, f64::max);
    let shifted: Vec<Value> = x.iter().map(|v| v.add_const(-m)).collect();
    let e: Vec<Value> = shifted.iter().map(Value::exp).collect();
    let lse = Value::sum(&e).log();
    shifted.iter().map(|v| v.sub(&lse)).collect()
}

/// -log softmax(logits)[target]
pub fn cross_entropy(logits: &[Value], target: usize) -> Value {
    let m = logits.iter().map(Value::data).fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<Value> = logits.iter().map(|v| v.add_const(-m).exp()).collect();
    Value::sum(&e).log().add_const(m).sub(&logits[target])
}

/// x / sqrt(mean(x^2) + eps), no weight (the tensor engine's `rmsnorm`).
pub fn rmsnorm(x: &[Value], eps: f64) -> Vec<Value> {
    let sq: Vec<Value> = x.iter().map(|v| v.mul(v)).collect();
    let r = Value::sum(&sq).scale(1.0 / x.len() as f64).add_const(eps).pow(-0.5);
    x.iter().map(|v| v.mul(&r)).collect()
}

/// Mean of values.
pub fn mean(xs: &[Value]) -> Value {
    Value::sum(xs).scale(1.0 / xs.len() as f64)
}

/// AdamW over scalar parameters, in f64: the same update as `optim::adamw_update` (decoupled
/// decay, bias-corrected moments), so a scalar and a tensor model can share hyper-parameters.
pub struct ScalarAdamW {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl ScalarAdamW {
    pub fn new(n_params: usize, betas: (f64, f64), eps: f64, weight_decay: f64) -> ScalarAdamW {
        ScalarAdamW {
            betas,
            eps,
            weight_decay,
            m: vec![0.0; n_params],
            v: vec![0.0; n_params],
            t: 0,
        }
    }

    /// One step at learning rate `lr` from the gradients of the last `backward`; `params` in the
    /// same order every step.
    pub fn step(&mut self, params: &[Value], lr: f64) {
        debug_assert_eq!(params.len(), self.m.len());
        self.t += 1;
        let (b1, b2) = self.betas;
        let (bias1, bias2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for ((p, m), v) in params.iter().zip(&mut self.m).zip(&mut self.v) {
            let g = p.grad();
            *m += (1.0 - b1) * (g - *m);
            *v += (1.0 - b2) * (g * g - *v);
            let denom = (*v / bias2).sqrt() + self.eps;
            p.set_data(p.data() * (1.0 - lr * self.weight_decay) - lr / bias1 * *m / denom);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// d/dx of f at x by central differences.
    fn numeric(f: impl Fn(f64) -> f64, x: f64) -> f64 {
        let h = 1e-6;
        (f(x + h) - f(x - h)) / (2.0 * h)
    }

    #[test]
    fn every_primitive_matches_finite_differences() {
        type Case = (&'static str, fn(&Value) -> Value, fn(f64) -> f64);
        let cases: Vec<Case> = vec![
            ("pow", |v| v.pow(3.0), |x| x.powf(3.0)),
            ("exp", |v| v.exp(), f64::exp),
            ("log", |v| v.log(), f64::ln),
            ("tanh", |v| v.tanh(), f64::tanh),
            ("relu", |v| v.relu(), |x| x.max(0.0)),
            ("sigmoid", |v| v.sigmoid(), |x| 1.0 / (1.0 + (-x).exp())),
            ("div", |v| v.div(&v.add_const(2.0)), |x| x / (x + 2.0)),
            ("sum", |v| Value::sum(&[v.clone(), v.mul(v), v.clone()]), |x| 2.0 * x + x * x),
        ];
        for (name, f, g) in cases {
            for x in [0.3, 1.7, -0.6] {
                if name == "log" && x < 0.0 {
                    continue;
                }
                let v = Value::new(x);
                let y = f(&v);
                assert!((y.data() - g(x)).abs() < 1e-12, "{name}({x})");
                y.backward();
                let want = numeric(g, x);
                assert!((v.grad() - want).abs() < 1e-6, "{name}'({x}) = {} vs {want}", v.grad());
            }
        }
    }

    /// micrograd's README example, with its published result.
    #[test]
    fn micrograd_readme_example() {
        let a = Value::new(-4.0);
        let b = Value::new(2.0);
        let mut c = a.add(&b);
        let mut d = a.mul(&b).add(&b.pow(3.0));
        c = c.add(&c.add_const(1.0));
        c = c.add(&c.add_const(1.0).add(&a.neg()));
        d = d.add(&d.scale(2.0).add(&b.add(&a).relu()));
        d = d.add(&d.scale(3.0).add(&b.sub(&a).relu()));
        let e = c.sub(&d);
        let f = e.pow(2.0);
        let mut g = f.scale(0.5);
        g = g.add(&Value::new(10.0).div(&f));
        g.backward();
        assert!((g.data() - 24.7041).abs() < 1e-4);
        assert!((a.grad() - 138.8338).abs() < 1e-4);
        assert!((b.grad() - 645.5773).abs() < 1e-4);
    }

    #[test]
    fn composites_are_consistent() {
        let x = values(&[0.5, -1.0, 2.0, 0.1]);
        let p = softmax(&x);
        let lp = log_softmax(&x);
        for (a, b) in p.iter().zip(&lp) {
            assert!((a.data().ln() - b.data()).abs() < 1e-12);
        }
        // d CE / d logits = softmax - onehot
        let loss = cross_entropy(&x, 2);
        assert!((loss.data() + lp[2].data()).abs() < 1e-12);
        loss.backward();
        for (i, (xi, pi)) in x.iter().zip(&p).enumerate() {
            let want = pi.data() - if i == 2 { 1.0 } else { 0.0 };
            assert!((xi.grad() - want).abs() < 1e-12);
        }
        let n = rmsnorm(&x, 0.0);
        let ms = n.iter().map(|v| v.data() * v.data()).sum::<f64>() / 4.0;
        assert!((ms - 1.0).abs() < 1e-12);
    }

    /// Adam's first step moves each weight by lr * sign(g), and repeated steps minimise.
    #[test]
    fn adamw_minimises_a_quadratic() {
        let w = values(&[3.0, -2.0]);
        let mut opt = ScalarAdamW::new(2, (0.9, 0.99), 1e-8, 0.0);
        let loss = |w: &[Value]| Value::sum(&[w[0].add_const(-1.0).pow(2.0), w[1].pow(2.0)]);
        loss(&w).backward();
        opt.step(&w, 0.1);
        assert!((w[0].data() - 2.9).abs() < 1e-9 && (w[1].data() + 1.9).abs() < 1e-9);
        for _ in 0..500 {
            loss(&w).backward();
            opt.step(&w, 0.05);
        }
        assert!(loss(&w).data() < 1e-3, "{:?}", w);
    }

    /// A node used twice gets both contributions; a second backward does not add to the first.
    #[test]
    fn shared_nodes_accumulate_and_backward_resets() {
        let x = Value::new(3.0);
        let y = x.mul(&x).add(&x);
        y.backward();
        assert_eq!(x.grad(), 7.0);
        y.backward();
        assert_eq!(x.grad(), 7.0);
    }

    /// A chain of a million adds builds, differentiates and drops without recursion.
    #[test]
    fn deep_chains_do_not_overflow_the_stack() {
        let x = Value::new(1.0);
        let mut y = x.clone();
        for _ in 0..1_000_000 {
            y = y.add(&x);
        }
        y.backward();
        assert_eq!(y.data(), 1_000_001.0);
        assert_eq!(x.grad(), 1_000_001.0);
    }
}
