//! The gRPC layer: a thin tonic service that converts requests and delegates to the supervisor.

pub mod client;
pub mod service;
