//! Named parameters in a stable (sorted) order, for the model, optimizer and checkpoints.
use std::collections::BTreeMap;

use crate::error::{EngineError, Result};
use crate::tensor::Tensor;

#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    params: BTreeMap<String, Tensor>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace a parameter; returns the one it replaced.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) -> Option<Tensor> {
        self.params.insert(name.into(), t)
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.params.get(name).ok_or_else(|| EngineError::MissingParam { name: name.to_string() })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    /// (name, tensor) in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|(n, t)| (n.as_str(), t))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Every parameter copied to `device` (trainable leaves stay trainable).
    pub fn to_device(&self, device: crate::Device) -> Result<ParamStore> {
        let params = self
            .params
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.to_device(device)?)))
            .collect::<Result<_>>()?;
        Ok(ParamStore { params })
    }

    /// Total number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.params.values().map(Tensor::numel).sum()
    }
}
