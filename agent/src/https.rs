//! What every HTTPS client of the agent shares (the OTLP exporter's, the
//! CLI's, the Kubernetes API lookups'): the TLS crypto provider.

/// Makes ring the process's TLS crypto provider, which every reqwest client
/// needs before it is built: reqwest is compiled without one of its own,
/// since the one it would bring, aws-lc, needs cmake to build. ring is also
/// what tonic uses (tls-ring). rustls deprecates ring's provider for lacking
/// post-quantum key exchange. Idempotent: a provider installed already
/// serves as well.
pub fn install_crypto_provider() {
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let _ = provider.install_default();
}
