//! Bearer tokens on gRPC calls: the client side (an interceptor that adds
//! `authorization: Bearer TOKEN`) and the server side (reading it back);
//! and the one way clients and workers reach a coordinator: over TLS,
//! pinned to its CA, when its URL is `https`.

use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::service::Interceptor;

/// Adds `authorization: Bearer TOKEN` to every call, or nothing when built
/// without a token.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// `None` when the token is not valid header text.
    pub fn new(token: Option<&str>) -> Option<Bearer> {
        match token {
            Some(t) => format!("Bearer {t}").parse().ok().map(|v| Bearer(Some(v))),
            None => Some(Bearer(None)),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel whose calls carry a [`Bearer`] token.
pub type WithBearer<C> = tonic::service::interceptor::InterceptedService<C, Bearer>;

/// The token of an `authorization: Bearer …` header.
pub fn bearer_token(meta: &MetadataMap) -> Option<&str> {
    meta.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Why no endpoint could be made for a coordinator URL.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("coordinator URL {url}: {why}")]
    Url { url: String, why: String },
    #[error(
        "coordinator URL {url} is https: its CA is needed to trust it (--ca FILE, or STRATA_CA; a coordinator on this machine leaves it beside its token)"
    )]
    NoCa { url: String },
    #[error("coordinator URL {url}: the CA: {why}")]
    Ca { url: String, why: String },
}

/// An endpoint for the coordinator at `url`: over TLS, trusting only
/// `ca_pem` (PEM), when the URL is `https`; plain otherwise (the
/// coordinator serves plain text on loopback only).
pub fn endpoint(
    url: &str,
    ca_pem: Option<&str>,
) -> Result<tonic::transport::Endpoint, EndpointError> {
    let e = tonic::transport::Endpoint::from_shared(url.to_string()).map_err(|e| {
        EndpointError::Url {
            url: url.into(),
            why: e.to_string(),
        }
    })?;
    if e.uri().scheme_str() != Some("https") {
        return Ok(e);
    }
    let ca = ca_pem.ok_or_else(|| EndpointError::NoCa { url: url.into() })?;
    if !ca.contains("-----BEGIN CERTIFICATE-----") {
        return Err(EndpointError::Ca {
            url: url.into(),
            why: "no PEM certificate in it".into(),
        });
    }
    e.tls_config(
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
    )
    .map_err(|e| EndpointError::Ca {
        url: url.into(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_needs_a_ca() {
        assert!(endpoint("http://127.0.0.1:1", None).is_ok());
        let e = endpoint("https://127.0.0.1:1", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("coordinator URL https://127.0.0.1:1 is https: its CA"),
            "{e}"
        );
        let e = endpoint("https://127.0.0.1:1", Some("junk"))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("no PEM certificate in it"), "{e}");
        let e = endpoint("not a url", None).unwrap_err().to_string();
        assert!(e.starts_with("coordinator URL not a url:"), "{e}");
    }

    #[test]
    fn a_token_goes_out_and_comes_back() {
        let mut b = Bearer::new(Some("s3cret")).unwrap();
        let req = b.call(tonic::Request::new(())).unwrap();
        assert_eq!(bearer_token(req.metadata()), Some("s3cret"));
        let mut none = Bearer::new(None).unwrap();
        let req = none.call(tonic::Request::new(())).unwrap();
        assert_eq!(bearer_token(req.metadata()), None);
        assert!(Bearer::new(Some("bad\ntoken")).is_none());
    }
}
