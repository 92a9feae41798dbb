//! The gRPC layer: thin tonic services that convert requests and delegate, and the client side.

pub mod client;
pub mod daemon;
pub mod service;
