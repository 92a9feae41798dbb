#![deny(unsafe_code)]

pub mod api;

/// Code generated from `proto/api.proto` (package `types`, service `API`).
pub mod proto {
    tonic::include_proto!("types");
}
