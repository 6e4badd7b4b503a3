//! A small seeded RNG (xoshiro256** seeded through splitmix64) for initialisation and sampling:
//! reproducible across runs and platforms. Bit-parity with torch's generator is not a goal.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    /// An independent stream for one consumer of randomness (`"init"`, `"data"`, `"sample"`):
    /// the seed mixed with the consumer's name, so drawing more from one stream (a longer
    /// sample, another batch size) never shifts another.
    pub fn stream(seed: u64, name: &str) -> Rng {
        // FNV-1a of the name; `new` runs the result through splitmix64.
        let h = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
        });
        Rng::new(seed ^ h)
    }

    /// The full state, for checkpoints.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    pub fn from_state(s: [u64; 4]) -> Rng {
        Rng { s }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f64() as f32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_well_spread() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(a.next_u64(), b.next_u64());
        let n = 100_000;
        let xs: Vec<f32> = (0..n).map(|_| a.normal()).collect();
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
        let us: Vec<f32> = (0..n).map(|_| b.uniform(-1.0, 3.0)).collect();
        assert!(us.iter().all(|&u| (-1.0..3.0).contains(&u)));
        let um = us.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        assert!((um - 1.0).abs() < 0.02, "uniform mean {um}");
    }

    #[test]
    fn streams_are_seeded_and_distinct() {
        assert_eq!(Rng::stream(1, "init"), Rng::stream(1, "init"));
        assert_ne!(Rng::stream(1, "init").next_u64(), Rng::stream(1, "data").next_u64());
        assert_ne!(Rng::stream(1, "init").next_u64(), Rng::stream(2, "init").next_u64());
    }
}
