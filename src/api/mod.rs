//! The gRPC layer: thin tonic services that convert requests and delegate.

pub mod daemon;
pub mod peer;
pub mod service;
