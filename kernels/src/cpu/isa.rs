//! Which instruction set the CPU kernels run: the best this CPU has, or the one the
//! `FEMTOCHAT_ISA` environment variable forces, so that a developer on an AVX-512 machine can
//! run and measure every path (`FEMTOCHAT_ISA=avx2 kernel-bench matmul ...`).
//!
//! Every dispatch goes through [`Isa::detect`] (the selected ISA), then obtains the marker type
//! of that ISA (`simd::Avx2Fma::new()`, ...), which checks the CPU again: forcing can only
//! narrow what runs, never enable an instruction the CPU lacks.

/// Environment variable that forces the ISA: `avx512`, `avx2`, `neon`, `portable` or `scalar`.
pub const ENV: &str = "FEMTOCHAT_ISA";

/// The instruction set a kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F (with AVX2 + FMA for the loops that have no 512-bit version).
    Avx512,
    /// AVX2 + FMA, 256-bit vectors.
    Avx2,
    /// aarch64 NEON.
    Neon,
    /// Plain Rust loops compiled for the build target (SSE2 on baseline x86_64): no runtime
    /// dispatch to wider units.
    Portable,
}

/// A `FEMTOCHAT_ISA` (or `--isa`) value that is unknown or that this CPU cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IsaError(pub String);

impl Isa {
    /// The ISA the kernels use: `FEMTOCHAT_ISA` when set, else the best this CPU runs.
    /// Read once per process.
    ///
    /// # Panics
    /// When `FEMTOCHAT_ISA` is invalid or names an ISA this CPU lacks; binaries call
    /// [`check_env`] at startup so that the user sees an error instead.
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| match from_env() {
            Ok(forced) => forced.unwrap_or_else(Isa::best),
            Err(e) => panic!("{e}"),
        })
    }

    /// The best ISA this CPU runs, whatever `FEMTOCHAT_ISA` says.
    pub fn best() -> Isa {
        [Isa::Avx512, Isa::Avx2, Isa::Neon]
            .into_iter()
            .find(|i| i.supported())
            .unwrap_or(Isa::Portable)
    }

    /// Whether this CPU can run `self`. AVX-512 counts only with AVX2 + FMA too (the kernels
    /// mix them), which every AVX-512 CPU has.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f") && Isa::Avx2.supported(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Whether `self` may use the AVX2 + FMA kernels (AVX-512 includes them).
    pub fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx512 | Isa::Avx2)
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
            Isa::Portable => "portable",
        }
    }

    /// An ISA by name (`scalar` is `portable`: no explicit SIMD), refused when this CPU
    /// cannot run it.
    pub fn parse(name: &str) -> Result<Isa, IsaError> {
        let isa = match name.trim().to_ascii_lowercase().as_str() {
            "avx512" => Isa::Avx512,
            "avx2" => Isa::Avx2,
            "neon" => Isa::Neon,
            "portable" | "scalar" => Isa::Portable,
            _ => {
                return Err(IsaError(format!(
                    "unknown instruction set {name:?}: expected avx512, avx2, neon, portable or \
                     scalar"
                )));
            }
        };
        if !isa.supported() {
            return Err(IsaError(format!(
                "this CPU cannot run {}: it has {} at best ({})",
                isa.name(),
                Isa::best().name(),
                cpu_features()
            )));
        }
        Ok(isa)
    }
}

/// The ISA `FEMTOCHAT_ISA` forces (`None` when unset or empty), or why it is refused.
pub fn from_env() -> Result<Option<Isa>, IsaError> {
    match std::env::var(ENV) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Isa::parse(&v).map(Some).map_err(|e| IsaError(format!("{ENV}={v}: {}", e.0))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(IsaError(format!("{ENV} is not valid UTF-8")))
        }
    }
}

/// Refuses an invalid `FEMTOCHAT_ISA` with a clear error; binaries call this before any
/// kernel runs, so `Isa::detect` never panics in them.
pub fn check_env() -> Result<Isa, IsaError> {
    from_env()?;
    Ok(Isa::detect())
}

/// The SIMD features this CPU reports, for error messages.
fn cpu_features() -> String {
    #[allow(unused_mut)]
    let mut have: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            have.push("avx512f");
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            have.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            have.push("fma");
        }
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("neon") {
        have.push("neon");
    }
    if have.is_empty() { "no wide SIMD".into() } else { format!("features: {}", have.join(", ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_names_and_refuses_the_rest() {
        assert_eq!(Isa::parse("portable"), Ok(Isa::Portable));
        assert_eq!(Isa::parse(" Scalar "), Ok(Isa::Portable));
        let e = Isa::parse("sse9").unwrap_err();
        assert!(e.0.contains("expected avx512, avx2"), "{e}");
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Neon] {
            match Isa::parse(isa.name()) {
                Ok(got) => assert!(got == isa && isa.supported()),
                Err(e) => assert!(!isa.supported() && e.0.contains("cannot run"), "{e}"),
            }
        }
        assert!(Isa::best().supported());
    }
}
