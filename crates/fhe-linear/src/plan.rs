//! The planner: keyless or packed results, and which block split, for a layer shape, a token count
//! and what the client cares about.
//!
//! Every candidate layout that the noise budget allows is costed with a small model of the work
//! and of the bytes on the wire ([`Cost`]): the server's time is dominated by four things, each
//! priced per unit by a constant ([`Planner`]):
//!
//! - each uploaded coefficient: its mask regenerated from the seed, four forward transforms;
//! - each complex multiply-accumulate of the products (streaming the weight spectra: memory-bound);
//! - each coefficient of a product polynomial: four backward transforms, joined to 64 bits;
//! - each coefficient of a packing key switch (`levels + 4` transforms).
//!
//! The constants differ between machines (AVX2 or AVX-512, memory bandwidth), so a server measures
//! them at start ([`crate::calibrate`]); [`Planner::default`] holds one machine's measurement.
//!
//! The planner then picks:
//!
//! - [`Preference::Latency`]: the least estimated time per request: server work plus the transfer
//!   at [`Planner::link_mbit_s`];
//! - [`Preference::Bandwidth`]: the fewest bytes per token among layouts whose server work stays
//!   within [`Planner::max_slowdown`] of the fastest one.
//!
//! Keyless results use [`HFHE_GLWE_2048_V1`], packed ones [`HFHE_GLWE_4096_V1`]: the only set whose
//! noise leaves room for packing 8-bit products. A packed plan also costs the one-time key upload
//! ([`PackingKey::serialized_len`]), reported beside it and not amortised here.

use crate::entities::{BlockLayout, LayerShape, ResultEncoding};
use crate::layout::LayerSpec;
use crate::packing::PackingKey;
use crate::params::{ParameterSet, HFHE_GLWE_2048_V1, HFHE_GLWE_4096_V1};
use crate::FheError;

/// What the client optimises for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preference {
    Latency,
    Bandwidth,
}

impl Preference {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "latency" => Some(Preference::Latency),
            "bandwidth" => Some(Preference::Bandwidth),
            _ => None,
        }
    }
}

/// The work of one request, in units the model prices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    /// Bytes up and down for the request.
    pub bytes: usize,
    /// Uploaded ciphertext coefficients.
    pub input_coefficients: f64,
    /// Complex multiply-accumulates of the products (four streams per input ciphertext).
    pub macs: f64,
    /// Coefficients of the product polynomials transformed back (one per group and output block).
    pub output_coefficients: f64,
    /// Key switches in the packing tree ([`tree_keyswitches`]).
    pub keyswitches: usize,
}

/// A costed candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub spec: LayerSpec,
    pub tokens: usize,
    pub cost: Cost,
    /// Estimated server milliseconds on one core.
    pub server_ms: f64,
    /// One-time key upload this plan needs (0 for keyless).
    pub key_bytes: usize,
}

impl Plan {
    pub fn bytes_per_token(&self) -> f64 {
        self.cost.bytes as f64 / self.tokens as f64
    }
}

/// The planner and its calibration.
#[derive(Debug, Clone, Copy)]
pub struct Planner {
    /// Nanoseconds per uploaded coefficient (one core).
    pub ns_per_input_coefficient: f64,
    /// Nanoseconds per complex multiply-accumulate (one core).
    pub ns_per_mac: f64,
    /// Nanoseconds per coefficient of a product polynomial (one core).
    pub ns_per_output_coefficient: f64,
    /// Nanoseconds per key-switched coefficient (one core).
    pub ns_per_keyswitch_coefficient: f64,
    /// Link speed assumed by [`Preference::Latency`].
    pub link_mbit_s: f64,
    /// [`Preference::Bandwidth`] accepts layouts up to this many times slower than the fastest.
    pub max_slowdown: f64,
    /// Largest tokens per polynomial considered (the server's weight memory grows with it).
    pub max_t_b: usize,
    /// Width of the activations the planned layouts carry ([`crate::ACTIVATION_BITS`]).
    pub activation_bits: u32,
}

impl Default for Planner {
    /// Measured by [`crate::calibrate`] on a 2-core AMD EPYC (AVX2) on 2026-12-03 (`hybrid bench
    /// planner`, BENCHMARKS.md); a worker measures its own machine at start.
    fn default() -> Self {
        Planner {
            ns_per_input_coefficient: 17.0,
            ns_per_mac: 0.55,
            ns_per_output_coefficient: 22.0,
            ns_per_keyswitch_coefficient: 50.0,
            link_mbit_s: 100.0,
            max_slowdown: 4.0,
            max_t_b: 16,
            activation_bits: crate::DEFAULT_ACTIVATION_BITS,
        }
    }
}

/// The least estimated server time of `plans` (infinite for none).
fn fastest_ms(plans: &[Plan]) -> f64 {
    plans
        .iter()
        .map(|p| p.server_ms)
        .fold(f64::INFINITY, f64::min)
}

/// Key switches of the packing tree for `products` merged `n_i` at a time: each level merges
/// the pairs that hold at least one ciphertext, and the products fill a prefix of the slots, so
/// level by level `ceil(present / 2)` (a partial pack costs less than a full one).
pub fn tree_keyswitches(products: usize, n_i: usize) -> usize {
    let mut present = products;
    let mut switches = 0;
    for _ in 0..n_i.trailing_zeros() {
        present = present.div_ceil(2);
        switches += present;
    }
    switches
}

/// The work and bytes of `spec` for `tokens` tokens.
pub fn cost(spec: &LayerSpec, tokens: usize) -> Cost {
    let n = spec.polynomial_size() as f64;
    let groups = spec.token_groups(tokens) as f64;
    let (ib, ob) = (spec.input_blocks() as f64, spec.output_blocks() as f64);
    let keyswitches = match spec.encoding {
        ResultEncoding::Keyless => 0,
        ResultEncoding::Packed => tree_keyswitches(
            spec.token_groups(tokens) * spec.output_blocks(),
            spec.layout.n_i,
        ),
    };
    Cost {
        bytes: spec.upload_bytes(tokens) + spec.download_bytes(tokens),
        input_coefficients: groups * ib * n,
        macs: 4.0 * groups * ib * ob * n / 2.0,
        output_coefficients: groups * ob * n,
        keyswitches,
    }
}

impl Planner {
    fn costed(&self, spec: LayerSpec, tokens: usize) -> Plan {
        let cost = cost(&spec, tokens);
        let n = spec.polynomial_size() as f64;
        let server_ms = (cost.input_coefficients * self.ns_per_input_coefficient
            + cost.macs * self.ns_per_mac
            + cost.output_coefficients * self.ns_per_output_coefficient
            + cost.keyswitches as f64 * n * self.ns_per_keyswitch_coefficient)
            / 1e6;
        let key_bytes = match spec.encoding {
            ResultEncoding::Keyless => 0,
            ResultEncoding::Packed => PackingKey::serialized_len(spec.params).unwrap_or(0),
        };
        Plan {
            spec,
            tokens,
            cost,
            server_ms,
            key_bytes,
        }
    }

    /// Every layout of `encoding` that the noise budget allows, costed for `tokens`.
    pub fn candidates(
        &self,
        shape: LayerShape,
        tokens: usize,
        encoding: ResultEncoding,
    ) -> Vec<Plan> {
        let params: &'static ParameterSet = match encoding {
            ResultEncoding::Keyless => &HFHE_GLWE_2048_V1,
            ResultEncoding::Packed => &HFHE_GLWE_4096_V1,
        };
        let n = params.polynomial_size;
        let mut out = Vec::new();
        let mut t_b = 1;
        while t_b <= self.max_t_b.min(tokens.next_power_of_two()) {
            let mut n_i = 1;
            while n_i * t_b <= n {
                let layout = BlockLayout {
                    n_i,
                    n_o: n / (n_i * t_b),
                    t_b,
                };
                if let Ok(spec) = LayerSpec::with_encoding_and_width(
                    params,
                    shape,
                    layout,
                    encoding,
                    self.activation_bits,
                ) {
                    out.push(self.costed(spec, tokens));
                }
                n_i *= 2;
            }
            t_b *= 2;
        }
        out
    }

    /// Estimated milliseconds of a request: server work plus transfer.
    pub fn latency_ms(&self, plan: &Plan) -> f64 {
        plan.server_ms + plan.cost.bytes as f64 * 8.0 / (self.link_mbit_s * 1e3)
    }

    /// The best of `plans` for `preference`.
    pub fn pick(&self, plans: &[Plan], preference: Preference) -> Option<Plan> {
        let by =
            |f: &dyn Fn(&Plan) -> f64| plans.iter().min_by(|a, b| f(a).total_cmp(&f(b))).copied();
        match preference {
            Preference::Latency => by(&|p| self.latency_ms(p)),
            Preference::Bandwidth => self.fewest_bytes_within(plans, fastest_ms(plans)),
        }
    }

    /// Of `plans`, the fewest bytes (then the least time) among those within
    /// [`Planner::max_slowdown`] of `fastest_ms`.
    fn fewest_bytes_within(&self, plans: &[Plan], fastest_ms: f64) -> Option<Plan> {
        let limit = fastest_ms * self.max_slowdown;
        plans
            .iter()
            .filter(|p| p.server_ms <= limit)
            .min_by(|a, b| {
                a.cost
                    .bytes
                    .cmp(&b.cost.bytes)
                    .then(a.server_ms.total_cmp(&b.server_ms))
            })
            .copied()
    }

    /// The plan for a layer: over the allowed encodings, every layout, then [`Planner::pick`].
    pub fn plan(
        &self,
        shape: LayerShape,
        tokens: usize,
        preference: Preference,
        allowed: &[ResultEncoding],
    ) -> Result<Plan, FheError> {
        let plans: Vec<Plan> = allowed
            .iter()
            .flat_map(|e| self.candidates(shape, tokens.max(1), *e))
            .collect();
        self.pick(&plans, preference)
            .ok_or_else(|| FheError::InvalidLayout(format!("no layout fits layer {shape}")))
    }

    /// The layout of `encoding` a server should offer for requests of `tokens` rows: the fewest
    /// bytes among its layouts whose server time stays within [`Planner::max_slowdown`] of the
    /// fastest layout of *any* encoding (else its fastest layout).
    pub fn offer(
        &self,
        shape: LayerShape,
        tokens: usize,
        encoding: ResultEncoding,
    ) -> Result<Plan, FheError> {
        let tokens = tokens.max(1);
        let own = self.candidates(shape, tokens, encoding);
        let all: Vec<Plan> = [ResultEncoding::Keyless, ResultEncoding::Packed]
            .iter()
            .flat_map(|e| self.candidates(shape, tokens, *e))
            .collect();
        self.fewest_bytes_within(&own, fastest_ms(&all))
            .or_else(|| {
                own.iter()
                    .min_by(|a, b| a.server_ms.total_cmp(&b.server_ms))
                    .copied()
            })
            .ok_or_else(|| {
                FheError::InvalidLayout(format!("no {encoding} layout fits layer {shape}"))
            })
    }

    /// Costs a given spec (e.g. one a server offers).
    pub fn cost_of(&self, spec: LayerSpec, tokens: usize) -> Plan {
        self.costed(spec, tokens.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_prefers_packed_and_latency_prefers_fewer_keyswitches() {
        let planner = Planner::default();
        let shape = LayerShape::new(2048, 6144);
        let both = [ResultEncoding::Keyless, ResultEncoding::Packed];
        let small = planner
            .plan(shape, 1, Preference::Bandwidth, &both)
            .unwrap();
        assert_eq!(small.spec.encoding, ResultEncoding::Packed);
        assert!(small.bytes_per_token() < 500_000.0, "{small:?}");
        let fast = planner.plan(shape, 1, Preference::Latency, &both).unwrap();
        assert!(fast.server_ms <= small.server_ms);
        // Keyless only: the keyless set, as the old chooser would pick for bytes.
        let keyless = planner
            .plan(shape, 1, Preference::Bandwidth, &[ResultEncoding::Keyless])
            .unwrap();
        assert_eq!(keyless.spec.params.id, HFHE_GLWE_2048_V1.id);
        assert_eq!(keyless.key_bytes, 0);
        // What a server offers for packed results: within reach of the keyless time.
        let offer = planner.offer(shape, 1, ResultEncoding::Packed).unwrap();
        assert_eq!(offer.spec.encoding, ResultEncoding::Packed);
        assert!(offer.bytes_per_token() < 500_000.0, "{offer:?}");
        assert!(offer.server_ms <= planner.max_slowdown * fast.server_ms.min(keyless.server_ms));
    }
}

#[cfg(test)]
mod tree {
    use super::tree_keyswitches;

    /// The count against the tree itself: levels of optional ciphertexts, a merge wherever a
    /// pair holds one.
    #[test]
    fn key_switches_are_counted_as_the_tree_merges() {
        for (products, n_i) in [
            (1usize, 1usize),
            (16, 64),
            (384, 256),
            (12, 8),
            (768, 512),
            (5, 2),
        ] {
            let mut level: Vec<bool> = (0..products.div_ceil(n_i) * n_i)
                .map(|i| i < products)
                .collect();
            let mut merges = 0;
            while level.len() > products.div_ceil(n_i) {
                level = level.chunks(2).map(|p| p[0] || p[1]).collect();
                merges += level.iter().filter(|p| **p).count();
            }
            assert_eq!(
                tree_keyswitches(products, n_i),
                merges,
                "{products} / {n_i}"
            );
        }
    }
}

#[cfg(test)]
mod table {
    use super::*;

    /// `cargo test --release -p fhe-linear plan::table -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn print_candidates() {
        let planner = Planner::default();
        for tokens in [1, 16] {
            for enc in [ResultEncoding::Keyless, ResultEncoding::Packed] {
                for p in planner.candidates(LayerShape::new(2048, 6144), tokens, enc) {
                    println!(
                        "T={tokens} {enc} n_i={} n_o={} t_b={} bits={}/{} KB/token={:.0} ms={:.1} ks={}",
                        p.spec.layout.n_i,
                        p.spec.layout.n_o,
                        p.spec.layout.t_b,
                        p.spec.input_bits,
                        p.spec.output_bits,
                        p.bytes_per_token() / 1e3,
                        p.server_ms,
                        p.cost.keyswitches
                    );
                }
            }
        }
    }
}
