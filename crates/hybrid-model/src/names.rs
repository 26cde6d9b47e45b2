//! Names of the linear modules, in both namings users meet per architecture, and the choice of
//! protected layers.
//!
//! The models use Hugging Face transformers' naming internally
//! (`model.layers.{i}.self_attn.q_proj`, ...). Each architecture adds the naming of its original
//! checkpoints, behind one trait ([`Naming`]):
//! - phi: the original phi-1.5 checkpoint numbers its blocks from 1 (block 0 is the embedding) and
//!   fuses the attention input projections: `layers.{i+1}.mixer.Wqkv` is
//!   `model.layers.{i}.self_attn.{q,k,v}_proj` computed as one matrix, `layers.{i+1}.mixer.out_proj`
//!   is `...self_attn.dense`, `layers.{i+1}.mlp.fc1` is `...mlp.fc1`, and `layers.{n+1}.linear` is
//!   `lm_head`;
//! - Llama: GGUF's (llama.cpp's) names, `blk.{i}.{attn_q,attn_k,attn_v,attn_output,ffn_gate,
//!   ffn_up,ffn_down}`.

use std::collections::BTreeSet;

use crate::ModelError;

/// A linear module of one decoder block (phi: q, k, v, dense, fc1, fc2; Llama: q, k, v, o, gate,
/// up, down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    Dense,
    Fc1,
    Fc2,
    O,
    Gate,
    Up,
    Down,
}

/// One linear module of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    Block(usize, Proj),
    LmHead,
}

impl Module {
    /// Hugging Face name (also the safetensors prefix of its weight and bias).
    pub fn hf_name(&self) -> String {
        match self {
            Module::LmHead => "lm_head".into(),
            Module::Block(i, p) => {
                let leaf = match p {
                    Proj::Q => "self_attn.q_proj",
                    Proj::K => "self_attn.k_proj",
                    Proj::V => "self_attn.v_proj",
                    Proj::Dense => "self_attn.dense",
                    Proj::Fc1 => "mlp.fc1",
                    Proj::Fc2 => "mlp.fc2",
                    Proj::O => "self_attn.o_proj",
                    Proj::Gate => "mlp.gate_proj",
                    Proj::Up => "mlp.up_proj",
                    Proj::Down => "mlp.down_proj",
                };
                format!("model.layers.{i}.{leaf}")
            }
        }
    }
}

/// A protected layer: one or more modules computed as one encrypted matrix (rows stacked in
/// order), under the name the user chose it by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProtectedLayer {
    pub name: String,
    pub parts: Vec<Module>,
}

impl ProtectedLayer {
    fn one(m: Module) -> Self {
        ProtectedLayer {
            name: m.hf_name(),
            parts: vec![m],
        }
    }
}

/// The names of an architecture's protectable layers.
pub trait Naming: Sync {
    /// Every name a user may give, with what it denotes, for a model of `blocks` blocks.
    fn layers(&self, blocks: usize) -> Vec<ProtectedLayer>;
    /// A compact description of the valid names (for errors).
    fn describe(&self, blocks: usize) -> String;
    /// The modules the model builds together because they read the same input (in the order
    /// their outputs are concatenated): protected ones among them can share one request.
    fn input_groups(&self, blocks: usize) -> Vec<Vec<Module>>;
}

/// phi: Hugging Face names and the original checkpoint's.
pub struct PhiNames;

impl Naming for PhiNames {
    fn layers(&self, blocks: usize) -> Vec<ProtectedLayer> {
        let mut out = Vec::new();
        for i in 0..blocks {
            for p in [Proj::Q, Proj::K, Proj::V, Proj::Dense, Proj::Fc1, Proj::Fc2] {
                out.push(ProtectedLayer::one(Module::Block(i, p)));
            }
            let orig = |leaf: &str, parts: Vec<Module>| ProtectedLayer {
                name: format!("layers.{}.{leaf}", i + 1),
                parts,
            };
            out.push(orig(
                "mixer.Wqkv",
                vec![
                    Module::Block(i, Proj::Q),
                    Module::Block(i, Proj::K),
                    Module::Block(i, Proj::V),
                ],
            ));
            out.push(orig("mixer.out_proj", vec![Module::Block(i, Proj::Dense)]));
            out.push(orig("mlp.fc1", vec![Module::Block(i, Proj::Fc1)]));
            out.push(orig("mlp.fc2", vec![Module::Block(i, Proj::Fc2)]));
        }
        out.push(ProtectedLayer::one(Module::LmHead));
        out.push(ProtectedLayer {
            name: format!("layers.{}.linear", blocks + 1),
            parts: vec![Module::LmHead],
        });
        out
    }

    fn describe(&self, blocks: usize) -> String {
        let last = blocks.saturating_sub(1);
        format!(
            "model.layers.{{0..{last}}}.self_attn.{{q_proj,k_proj,v_proj,dense}}, \
             model.layers.{{0..{last}}}.mlp.{{fc1,fc2}}, lm_head; original naming: \
             layers.{{1..{blocks}}}.mixer.{{Wqkv,out_proj}}, layers.{{1..{blocks}}}.mlp.{{fc1,fc2}}, \
             layers.{}.linear; `*` matches any part of a name",
            blocks + 1
        )
    }

    fn input_groups(&self, blocks: usize) -> Vec<Vec<Module>> {
        (0..blocks)
            .map(|i| {
                [Proj::Q, Proj::K, Proj::V]
                    .map(|p| Module::Block(i, p))
                    .to_vec()
            })
            .collect()
    }
}

/// Llama: Hugging Face names and GGUF's.
pub struct LlamaNames;

/// The linears of a Llama block with their GGUF names.
pub const LLAMA_PROJECTIONS: [(Proj, &str); 7] = [
    (Proj::Q, "attn_q"),
    (Proj::K, "attn_k"),
    (Proj::V, "attn_v"),
    (Proj::O, "attn_output"),
    (Proj::Gate, "ffn_gate"),
    (Proj::Up, "ffn_up"),
    (Proj::Down, "ffn_down"),
];

impl Naming for LlamaNames {
    fn layers(&self, blocks: usize) -> Vec<ProtectedLayer> {
        let mut out = Vec::new();
        for i in 0..blocks {
            for (p, _) in LLAMA_PROJECTIONS {
                out.push(ProtectedLayer::one(Module::Block(i, p)));
            }
            for (p, gguf) in LLAMA_PROJECTIONS {
                out.push(ProtectedLayer {
                    name: format!("blk.{i}.{gguf}"),
                    parts: vec![Module::Block(i, p)],
                });
            }
        }
        out
    }

    fn describe(&self, blocks: usize) -> String {
        let last = blocks.saturating_sub(1);
        format!(
            "model.layers.{{0..{last}}}.self_attn.{{q,k,v,o}}_proj, \
             model.layers.{{0..{last}}}.mlp.{{gate,up,down}}_proj; GGUF naming: \
             blk.{{0..{last}}}.{{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}}; \
             `*` matches any part of a name"
        )
    }

    fn input_groups(&self, blocks: usize) -> Vec<Vec<Module>> {
        let mut out = Vec::new();
        for i in 0..blocks {
            out.push(
                [Proj::Q, Proj::K, Proj::V]
                    .map(|p| Module::Block(i, p))
                    .to_vec(),
            );
            out.push([Proj::Gate, Proj::Up].map(|p| Module::Block(i, p)).to_vec());
        }
        out
    }
}

/// Glob match where `*` stands for any (possibly empty) run of characters.
pub(crate) fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|k| tail.is_char_boundary(k) && glob(rest, &tail[k..]))
        }
    }
}

/// Resolves user-given names or patterns (`layers.*.mixer.Wqkv`, comma-separated lists too) to
/// protected layers of a model of `blocks` blocks named by `naming`. A layer named twice (in
/// both namings) is protected once, under the first name given; unknown names and choices that
/// overlap otherwise are errors, and the error lists the valid names.
pub fn resolve(
    patterns: &[String],
    naming: &dyn Naming,
    blocks: usize,
) -> Result<Vec<ProtectedLayer>, ModelError> {
    let all = naming.layers(blocks);
    let mut chosen: Vec<ProtectedLayer> = Vec::new();
    for pattern in patterns
        .iter()
        .flat_map(|p| p.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let matched: Vec<&ProtectedLayer> = all.iter().filter(|l| glob(pattern, &l.name)).collect();
        if matched.is_empty() {
            return Err(ModelError::UnknownModule {
                name: pattern.to_string(),
                valid: naming.describe(blocks),
            });
        }
        for l in matched {
            if !chosen
                .iter()
                .any(|c| c.name == l.name || c.parts == l.parts)
            {
                chosen.push(l.clone());
            }
        }
    }
    let mut seen = BTreeSet::new();
    for l in &chosen {
        for m in &l.parts {
            if !seen.insert(*m) {
                return Err(ModelError::OverlappingProtection(m.hf_name()));
            }
        }
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phi(p: &[&str]) -> Result<Vec<ProtectedLayer>, ModelError> {
        let p: Vec<String> = p.iter().map(|s| s.to_string()).collect();
        resolve(&p, &PhiNames, 24)
    }

    fn names(p: &[&str]) -> Result<Vec<String>, ModelError> {
        Ok(phi(p)?.into_iter().map(|l| l.name).collect())
    }

    #[test]
    fn both_namings_and_patterns_resolve() {
        let wqkv = phi(&["layers.1.mixer.Wqkv"]).unwrap();
        assert_eq!(
            wqkv[0].parts,
            vec![
                Module::Block(0, Proj::Q),
                Module::Block(0, Proj::K),
                Module::Block(0, Proj::V)
            ]
        );
        let q = phi(&["model.layers.1.self_attn.q_proj"]).unwrap();
        assert_eq!(q[0].parts, vec![Module::Block(1, Proj::Q)]);
        assert_eq!(names(&["layers.*.mixer.Wqkv"]).unwrap().len(), 24);
        assert_eq!(
            names(&["model.layers.3.mlp.fc1, layers.5.mlp.fc2"])
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            names(&["layers.25.linear"]).unwrap(),
            vec!["layers.25.linear"]
        );
    }

    #[test]
    fn unknown_and_overlapping_names_are_errors() {
        let err = names(&["layers.1.mixer.Wq"]).unwrap_err();
        assert!(err.to_string().contains("mixer.{Wqkv,out_proj}"), "{err}");
        assert!(names(&["model.layers.24.mlp.fc1"]).is_err());
        assert!(names(&["model.layers.0.input_layernorm"]).is_err());
        assert!(matches!(
            names(&["layers.1.mixer.Wqkv", "model.layers.0.self_attn.k_proj"]),
            Err(ModelError::OverlappingProtection(_))
        ));
    }

    #[test]
    fn llama_names_in_both_namings() {
        let llama = |p: &[&str]| {
            let p: Vec<String> = p.iter().map(|s| s.to_string()).collect();
            resolve(&p, &LlamaNames, 30)
        };
        let q = llama(&["blk.3.attn_q"]).unwrap();
        assert_eq!(q[0].parts, vec![Module::Block(3, Proj::Q)]);
        assert_eq!(
            llama(&["model.layers.*.self_attn.*"]).unwrap().len(),
            4 * 30
        );
        assert_eq!(llama(&["blk.*.ffn_*"]).unwrap().len(), 3 * 30);
        // The same layer in both namings is protected once.
        let both = llama(&["blk.0.attn_v", "model.layers.0.self_attn.v_proj"]).unwrap();
        assert_eq!(both.len(), 1);
        let err = llama(&["layers.1.mixer.Wqkv"]).unwrap_err().to_string();
        assert!(err.contains("attn_output"), "{err}");
        assert!(llama(&["blk.30.attn_q"]).is_err());
    }
}
