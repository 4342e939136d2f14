//! Bearer tokens on gRPC calls: the client side (an interceptor that adds
//! `authorization: Bearer TOKEN`) and the server side (reading it back).

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

#[cfg(test)]
mod tests {
    use super::*;

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
