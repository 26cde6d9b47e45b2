//! Helpers shared by the integration tests: a tiny deterministic generator and a round trip.
#![allow(dead_code)]

use fhe_linear::*;

/// SplitMix64: deterministic test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn i8s(&mut self, len: usize) -> Vec<i8> {
        (0..len).map(|_| self.next() as u8 as i8).collect()
    }

    /// Uniform signed `bits`-bit values.
    pub fn activations(&mut self, len: usize, bits: u32) -> Vec<i16> {
        let half = 1i64 << (bits - 1);
        (0..len)
            .map(|_| (self.below(2 * half as u64) as i64 - half) as i16)
            .collect()
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

pub struct Case {
    pub spec: LayerSpec,
    pub w: Vec<i8>,
    pub b: Vec<i64>,
    pub x: Vec<i16>,
    pub tokens: usize,
}

impl Case {
    pub fn random(d_in: usize, d_out: usize, tokens: usize, t_b: usize, seed: u64) -> Case {
        let mut rng = Rng(seed);
        let spec =
            LayerSpec::choose(&HFHE_GLWE_2048_V1, LayerShape::new(d_in, d_out), t_b).unwrap();
        let w = rng.i8s(d_in * d_out);
        let b = (0..d_out).map(|_| rng.below(2001) as i64 - 1000).collect();
        let x = rng.activations(tokens * d_in, spec.activation_bits);
        Case {
            spec,
            w,
            b,
            x,
            tokens,
        }
    }

    pub fn expected(&self) -> Vec<i64> {
        simulate(self.spec.shape, &self.x, self.tokens, &self.w, &self.b)
    }

    /// Encrypt, serialise, parse, apply, serialise, parse, decrypt.
    pub fn round_trip(&self, key: &ClientKey, layer: &CompiledLayer) -> (Vec<i64>, Vec<i64>) {
        let limits = Limits::default();
        let batch = key.encrypt(&self.spec, &self.x, self.tokens).unwrap();
        let batch = EncryptedBatch::from_bytes(&batch.to_bytes(), &limits).unwrap();
        let result = layer.apply(&batch).unwrap();
        let result = EncryptedResult::from_bytes(&result.to_bytes(), &limits).unwrap();
        key.decrypt_with_noise(&self.spec, &result).unwrap()
    }

    pub fn compile(&self) -> CompiledLayer {
        CompiledLayer::compile(self.spec, &self.w, &self.b).unwrap()
    }
}
