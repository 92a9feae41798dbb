//! The gRPC layer: thin tonic services that convert requests and delegate.

pub mod content_type;
pub mod daemon;
pub mod grpc_message;
pub mod one_message;
pub mod pacing;
pub mod peer;
pub mod request_body;
pub mod request_budget;
pub mod service;
pub mod stream_places;
