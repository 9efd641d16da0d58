//! The generated types, clients and servers of bicsi's own gRPC API (`proto/bicsi.proto`: the
//! split mode's Cluster and Agent services and the engine host's EngineHost service). Plain
//! generated code at the bottom floor, so that the OS seam that serves the engine host
//! (`os::engine::host`) and the wire that serves the cluster (`remote`, which re-exports this as
//! `remote::pb`) both stand on it; it must hold nothing written by hand.

#![allow(clippy::all)]

tonic::include_proto!("bicsi.v1");
