//! Names of the linear modules, in both namings users meet, and the choice of protected layers.
//!
//! The model uses Hugging Face transformers' naming internally
//! (`model.layers.{i}.self_attn.q_proj`, ...). The original phi-1.5 checkpoint numbers its blocks
//! from 1 (block 0 is the embedding) and fuses the attention input projections:
//! `layers.{i+1}.mixer.Wqkv` is `model.layers.{i}.self_attn.{q,k,v}_proj` computed as one matrix,
//! `layers.{i+1}.mixer.out_proj` is `...self_attn.dense`, `layers.{i+1}.mlp.fc1` is `...mlp.fc1`,
//! and `layers.{n+1}.linear` is `lm_head`.

use std::collections::BTreeSet;

use crate::ModelError;

/// A linear module of one decoder block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    Dense,
    Fc1,
    Fc2,
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

/// Every name a user may give, with what it denotes, for a model of `layers` blocks.
pub fn all_names(layers: usize) -> Vec<ProtectedLayer> {
    let mut out = Vec::new();
    let one = |m: Module| ProtectedLayer {
        name: m.hf_name(),
        parts: vec![m],
    };
    for i in 0..layers {
        for p in [Proj::Q, Proj::K, Proj::V, Proj::Dense, Proj::Fc1, Proj::Fc2] {
            out.push(one(Module::Block(i, p)));
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
    out.push(one(Module::LmHead));
    out.push(ProtectedLayer {
        name: format!("layers.{}.linear", layers + 1),
        parts: vec![Module::LmHead],
    });
    out
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

/// Resolves user-given names or patterns (`layers.*.mixer.Wqkv`) to protected layers. Unknown
/// names and overlapping choices are errors; the error lists the valid names.
pub fn resolve(patterns: &[String], layers: usize) -> Result<Vec<ProtectedLayer>, ModelError> {
    let all = all_names(layers);
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
                valid: valid_names(layers),
            });
        }
        for l in matched {
            if !chosen.iter().any(|c| c.name == l.name) {
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

/// A compact description of the valid names.
pub fn valid_names(layers: usize) -> String {
    let last = layers.saturating_sub(1);
    format!(
        "model.layers.{{0..{last}}}.self_attn.{{q_proj,k_proj,v_proj,dense}}, \
         model.layers.{{0..{last}}}.mlp.{{fc1,fc2}}, lm_head; original naming: \
         layers.{{1..{layers}}}.mixer.{{Wqkv,out_proj}}, layers.{{1..{layers}}}.mlp.{{fc1,fc2}}, \
         layers.{}.linear; `*` matches any part of a name",
        layers + 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &[&str]) -> Result<Vec<String>, ModelError> {
        let p: Vec<String> = p.iter().map(|s| s.to_string()).collect();
        Ok(resolve(&p, 24)?.into_iter().map(|l| l.name).collect())
    }

    #[test]
    fn both_namings_and_patterns_resolve() {
        let wqkv = resolve(&["layers.1.mixer.Wqkv".into()], 24).unwrap();
        assert_eq!(
            wqkv[0].parts,
            vec![
                Module::Block(0, Proj::Q),
                Module::Block(0, Proj::K),
                Module::Block(0, Proj::V)
            ]
        );
        let q = resolve(&["model.layers.1.self_attn.q_proj".into()], 24).unwrap();
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
}
