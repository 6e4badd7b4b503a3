//! CPython's `random.Random` (MT19937 seeded from an int) and the few methods nanochat relies on
//! for which examples it evaluates and trains on: `shuffle` (CORE subsampling, `TaskMixture`),
//! `sample` (CORE few-shot examples), `choice` and `random` (the spelling tasks). Every method
//! consumes the generator exactly as CPython 3.10-3.12 does, so a seed picks the same items.
//! numpy's `default_rng(seed).permutation(n)` (the order of nanochat's task datasets) is in
//! [`numpy`].
pub mod numpy;

const N: usize = 624;
const M: usize = 397;

/// `random.Random(seed)` for an integer seed.
#[derive(Clone)]
pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl PyRandom {
    /// `random.Random(seed)`: CPython seeds with the 32-bit words of |seed|, least significant
    /// first (`init_by_array`).
    pub fn new(seed: i64) -> PyRandom {
        let n = seed.unsigned_abs();
        let mut key = vec![n as u32];
        if n >> 32 != 0 {
            key.push((n >> 32) as u32);
        }
        let mut r = PyRandom { mt: [0; N], index: N };
        r.init_by_array(&key);
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            let prev = self.mt[i - 1];
            self.mt[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19_650_218);
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
        }
        self.mt[0] = 0x8000_0000;
    }

    /// One 32-bit output of MT19937 (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        if self.index >= N {
            for k in 0..N {
                let y = (self.mt[k] & UPPER) | (self.mt[(k + 1) % N] & LOWER);
                let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
                self.mt[k] = self.mt[(k + M) % N] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `getrandbits(k)` for k <= 64: 32-bit words least significant first, the last one
    /// keeping its top bits.
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        assert!(k <= 64, "getrandbits supports at most 64 bits here");
        if k == 0 {
            return 0;
        }
        if k <= 32 {
            return (self.next_u32() >> (32 - k)) as u64;
        }
        let lo = self.next_u32() as u64;
        let hi = (self.next_u32() >> (64 - k)) as u64;
        lo | (hi << 32)
    }

    /// `_randbelow(n)`: rejection sampling on `n.bit_length()` bits; 0 for n = 0.
    pub fn randbelow(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let k = 64 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// `random()`: 53 random bits as a float in [0, 1).
    pub fn random(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `shuffle(x)` in place (Fisher-Yates from the end).
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.randbelow(i as u64 + 1) as usize;
            x.swap(i, j);
        }
    }

    /// `choice(seq)`; None for an empty slice (Python raises).
    pub fn choice<'a, T>(&mut self, seq: &'a [T]) -> Option<&'a T> {
        if seq.is_empty() {
            return None;
        }
        let i = self.randbelow(seq.len() as u64) as usize;
        seq.get(i)
    }

    /// Indices `sample(range(n), k)` picks, in order; None when k > n (Python raises).
    ///
    /// CPython draws from a shrinking pool when the population is small next to a set of k
    /// items, and otherwise redraws indices already taken; both paths are reproduced.
    pub fn sample_indices(&mut self, n: usize, k: usize) -> Option<Vec<usize>> {
        if k > n {
            return None;
        }
        let mut setsize = 21usize;
        if k > 5 {
            // 3k is never a power of 4, so the ceil of the float log cannot land on an edge.
            let e = ((k * 3) as f64).ln() / 4f64.ln();
            setsize += 4usize.pow(e.ceil() as u32);
        }
        let mut out = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow((n - i) as u64) as usize;
                out.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = std::collections::HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n as u64) as usize;
                while selected.contains(&j) {
                    j = self.randbelow(n as u64) as usize;
                }
                selected.insert(j);
                out.push(j);
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::PyRandom;

    // Every expected value below was printed by CPython 3.11.7.

    /// `[random.Random(s).getrandbits(32) for s in (0, 1, 42, 1337, 2**40 + 5)]`
    #[test]
    fn first_words_match_cpython() {
        let want: [(i64, u32); 5] = WORDS;
        for (seed, w) in want {
            assert_eq!(PyRandom::new(seed).next_u32(), w, "seed {seed}");
        }
    }

    /// `r = random.Random(1337); [r.random() for _ in range(3)]`
    #[test]
    fn random_floats_match_cpython() {
        let mut r = PyRandom::new(1337);
        let got: Vec<f64> = (0..3).map(|_| r.random()).collect();
        assert_eq!(got, RANDOM_1337.to_vec());
    }

    /// `x = list(range(20)); random.Random(1337).shuffle(x)`
    #[test]
    fn shuffle_matches_cpython() {
        let mut x: Vec<usize> = (0..20).collect();
        PyRandom::new(1337).shuffle(&mut x);
        assert_eq!(x, SHUFFLE_1337_20.to_vec());
        // The mixture shuffle: 1000 items, seed 42 (first ten shown).
        let mut y: Vec<usize> = (0..1000).collect();
        PyRandom::new(42).shuffle(&mut y);
        assert_eq!(&y[..10], &SHUFFLE_42_1000_HEAD);
    }

    /// CORE few-shot draws: `random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)`
    /// on both of CPython's paths (pool: n <= setsize; set: n > setsize).
    #[test]
    fn sample_matches_cpython() {
        // k = 10 -> setsize 85: n = 50 takes the pool path, n = 500 the set path.
        let mut r = PyRandom::new(1234 + 7);
        assert_eq!(r.sample_indices(49, 10).unwrap(), SAMPLE_POOL.to_vec());
        let mut r = PyRandom::new(1234 + 7);
        assert_eq!(r.sample_indices(499, 10).unwrap(), SAMPLE_SET.to_vec());
        let mut r = PyRandom::new(1234);
        assert_eq!(r.sample_indices(229, 3).unwrap(), SAMPLE_K3.to_vec());
        assert!(PyRandom::new(1).sample_indices(2, 3).is_none());
    }

    /// `r = random.Random(5); [r.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(8)]` and
    /// `r.getrandbits(40)`, `r.randbelow(10**10)` (via randrange).
    #[test]
    fn choice_and_wide_draws_match_cpython() {
        let letters: Vec<char> = "abcdefghijklmnopqrstuvwxyz".chars().collect();
        let mut r = PyRandom::new(5);
        let got: String = (0..8).map(|_| *r.choice(&letters).unwrap()).collect();
        assert_eq!(got, CHOICE_5);
        assert_eq!(r.getrandbits(40), BITS40_AFTER);
        assert_eq!(r.randbelow(10_000_000_000), RANDRANGE_AFTER);
    }

    include!("cpython_values.rs");
}
