//! `numpy.random.default_rng(seed).permutation(n)`: the order nanochat's tasks put their rows in
//! (`HubDataset.shuffle(seed)`, equal to Hugging Face `datasets`' shuffle). default_rng is PCG64
//! (XSL-RR 128/64) seeded through a `SeedSequence`; `Generator.shuffle` swaps from the end with
//! bounded draws taken by masked rejection on 32-bit halves of the 64-bit outputs.

/// numpy's `SeedSequence(seed).generate_state(4, uint64)` for an int seed < 2^64.
fn seed_sequence_state(seed: u64) -> [u64; 4] {
    const INIT_A: u32 = 0x43b0_d7e5;
    const MULT_A: u32 = 0x931e_8875;
    const INIT_B: u32 = 0x8b51_f9dd;
    const MULT_B: u32 = 0x58f3_8ded;
    const MIX_MULT_L: u32 = 0xca01_f9dd;
    const MIX_MULT_R: u32 = 0x4973_f715;
    const XSHIFT: u32 = 16;
    const POOL: usize = 4;

    let mut entropy = vec![seed as u32];
    if seed >> 32 != 0 {
        entropy.push((seed >> 32) as u32);
    }
    let mut hash_const = INIT_A;
    let mut hashmix = |value: u32| -> u32 {
        let mut v = value ^ hash_const;
        hash_const = hash_const.wrapping_mul(MULT_A);
        v = v.wrapping_mul(hash_const);
        v ^ (v >> XSHIFT)
    };
    let mix = |x: u32, y: u32| -> u32 {
        let r = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
        r ^ (r >> XSHIFT)
    };
    let mut pool = [0u32; POOL];
    for (i, p) in pool.iter_mut().enumerate() {
        *p = hashmix(entropy.get(i).copied().unwrap_or(0));
    }
    for src in 0..POOL {
        for dst in 0..POOL {
            if src != dst {
                let h = hashmix(pool[src]);
                pool[dst] = mix(pool[dst], h);
            }
        }
    }
    for &e in entropy.iter().skip(POOL) {
        for p in pool.iter_mut() {
            let h = hashmix(e);
            *p = mix(*p, h);
        }
    }
    // Eight 32-bit words viewed as four little-endian u64s.
    let mut hash_const = INIT_B;
    let mut words = [0u32; 8];
    for (i, w) in words.iter_mut().enumerate() {
        let mut v = pool[i % POOL] ^ hash_const;
        hash_const = hash_const.wrapping_mul(MULT_B);
        v = v.wrapping_mul(hash_const);
        *w = v ^ (v >> XSHIFT);
    }
    std::array::from_fn(|i| words[2 * i] as u64 | (words[2 * i + 1] as u64) << 32)
}

/// numpy's PCG64 bit generator with its 32-bit output buffer.
pub struct Pcg64 {
    state: u128,
    inc: u128,
    /// The high half of the last 64-bit output, served by the next 32-bit draw.
    spare: Option<u32>,
}

const PCG_MULT: u128 = (2_549_297_995_355_413_924u128 << 64) | 4_865_540_595_714_422_341u128;

impl Pcg64 {
    /// `PCG64(seed)` as `default_rng(seed)` builds it.
    pub fn new(seed: u64) -> Pcg64 {
        let s = seed_sequence_state(seed);
        let initstate = (s[0] as u128) << 64 | s[1] as u128;
        let initseq = (s[2] as u128) << 64 | s[3] as u128;
        let mut g = Pcg64 { state: 0, inc: (initseq << 1) | 1, spare: None };
        g.step();
        g.state = g.state.wrapping_add(initstate);
        g.step();
        g
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let xored = ((self.state >> 64) as u64) ^ (self.state as u64);
        xored.rotate_right((self.state >> 122) as u32)
    }

    pub fn next_u32(&mut self) -> u32 {
        if let Some(hi) = self.spare.take() {
            return hi;
        }
        let v = self.next_u64();
        self.spare = Some((v >> 32) as u32);
        v as u32
    }

    /// numpy's `random_interval(max)`: uniform in [0, max] by masked rejection.
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        loop {
            let v = if max <= u32::MAX as u64 {
                (self.next_u32() as u64) & mask
            } else {
                self.next_u64() & mask
            };
            if v <= max {
                return v;
            }
        }
    }
}

/// `numpy.random.default_rng(seed).permutation(n)`.
pub fn permutation(seed: u64, n: usize) -> Vec<usize> {
    let mut g = Pcg64::new(seed);
    let mut x: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = g.interval(i as u64) as usize;
        x.swap(i, j);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values printed by numpy 2.x (see each test's expression).

    /// `np.random.SeedSequence(42).generate_state(4, np.uint64)`
    #[test]
    fn seed_sequence_matches_numpy() {
        assert_eq!(seed_sequence_state(42), SEEDSEQ_42);
    }

    /// `np.random.PCG64(42).random_raw(3)`
    #[test]
    fn pcg64_matches_numpy() {
        let mut g = Pcg64::new(42);
        let got: Vec<u64> = (0..3).map(|_| g.next_u64()).collect();
        assert_eq!(got, RAW_42.to_vec());
    }

    /// `np.random.default_rng(42).permutation(n)` for the sizes of the eval sets.
    #[test]
    fn permutation_matches_numpy() {
        assert_eq!(permutation(42, 20), PERM_42_20.to_vec());
        assert_eq!(&permutation(42, 1319)[..10], &PERM_42_1319_HEAD);
        assert_eq!(&permutation(42, 14042)[..10], &PERM_42_14042_HEAD);
        assert_eq!(&permutation(42, 7473)[7463..], &PERM_42_7473_TAIL);
    }

    include!("numpy_values.rs");
}
