//! Policy: SMI-shaped authorization and traffic documents, validated as a set, and the
//! engine that decides whether a verified source may reach a destination.
//!
//! - [`model`] reads multi-document YAML into typed documents and validates the whole set,
//!   reporting every error on one line (`FILE:LINE: document N (KIND NS/NAME): FIELD: MSG`).
//! - [`engine`] compiles a set once and answers [`engine::Engine::decide`] per connection
//!   or request, cheaply and without I/O.
//! - `matcher` holds the regex anchoring, method and header matching, and path
//!   normalisation that validation and enforcement share; `yaml` the line-numbered tree.
//!
//! - [`bundle`] is the signed form a set travels and rests in (`weft policy apply` signs it,
//!   every agent verifies it).
//!
//! These modules do no I/O: the agent's policy store and sync (`crate::agent::policy`) and
//! the proxy's enforcement points sit around them.

pub mod bundle;
pub mod engine;
pub mod matcher;
pub mod model;
mod yaml;

#[cfg(test)]
mod tests;
