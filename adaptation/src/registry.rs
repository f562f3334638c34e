//! The services a node hosts, in registration order (the order every phase visits them in).

use crate::error::AdaptationError;
use crate::service::Plugin;
use gobelins_locator::{ServiceId, ServiceSpec};

/// The registered services of one node.
#[derive(Default)]
pub struct Registry {
    /// Each declaration is read once, at registration: it is fixed for the service's lifetime
    /// and a lookup per request must not build one.
    plugins: Vec<(ServiceSpec, Box<dyn Plugin>)>,
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
        let id = spec.id;
        self.plugins.push((spec, plugin));
        Ok(id)
    }

    /// The service with this id.
    pub fn get(&self, id: ServiceId) -> Option<&dyn Plugin> {
        self.plugins.iter().find(|(spec, _)| spec.id == id).map(|(_, p)| p.as_ref())
    }

    /// The declaration of the service with this id.
    pub fn spec(&self, id: ServiceId) -> Option<&ServiceSpec> {
        self.plugins.iter().find(|(spec, _)| spec.id == id).map(|(spec, _)| spec)
    }

    /// Every service, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Plugin> + '_ {
        self.plugins.iter().map(|(_, p)| p.as_ref())
    }

    /// Their ids, in registration order: what a [`crate::Period`] visits.
    pub fn ids(&self) -> Vec<ServiceId> {
        self.plugins.iter().map(|(spec, _)| spec.id).collect()
    }

    /// Their declarations, for the locator.
    pub fn specs(&self) -> Vec<ServiceSpec> {
        self.plugins.iter().map(|(spec, _)| spec.clone()).collect()
    }
}
