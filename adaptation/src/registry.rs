//! The services a node hosts, in registration order (the order every phase visits them in).

use crate::error::AdaptationError;
use crate::service::Plugin;
use gobelins_locator::{ServiceId, ServiceSpec};

/// The registered services of one node.
#[derive(Default)]
pub struct Registry {
    plugins: Vec<Box<dyn Plugin>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Adds a service; its declaration must be valid and its id unused.
    pub fn register(&mut self, plugin: Box<dyn Plugin>) -> Result<ServiceId, AdaptationError> {
        let spec = plugin.spec();
        spec.validate().map_err(|e| AdaptationError::Registration(e.to_string()))?;
        if self.get(spec.id).is_some() {
            return Err(AdaptationError::Registration(format!(
                "service id {} is already registered",
                spec.id
            )));
        }
        self.plugins.push(plugin);
        Ok(spec.id)
    }

    /// The service with this id.
    pub fn get(&self, id: ServiceId) -> Option<&dyn Plugin> {
        self.plugins.iter().find(|p| p.spec().id == id).map(|p| p.as_ref())
    }

    /// Every service, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Plugin> + '_ {
        self.plugins.iter().map(|p| p.as_ref())
    }

    /// Their ids, in registration order: what a [`crate::Period`] visits.
    pub fn ids(&self) -> Vec<ServiceId> {
        self.plugins.iter().map(|p| p.spec().id).collect()
    }

    /// Their declarations, for the locator.
    pub fn specs(&self) -> Vec<ServiceSpec> {
        self.plugins.iter().map(|p| p.spec()).collect()
    }
}
