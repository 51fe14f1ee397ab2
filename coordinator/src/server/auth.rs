//! Call admission, before any handler runs: the bearer token when the coordinator has one (a
//! call without `authorization: Bearer <token>` or with another token is refused), and for
//! the worker service with mutual TLS, a client certificate the TLS layer verified against the
//! client CA.

use std::sync::Arc;

use tonic::{Request, Status};

#[derive(Clone)]
pub struct BearerAuth {
    token: Option<Arc<[u8]>>,
    require_client_cert: bool,
}

impl BearerAuth {
    /// `None` accepts every call (loopback development setups).
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(|t| Arc::from(t.as_bytes())),
            require_client_cert: false,
        }
    }

    /// Also requires a verified TLS client certificate (mutual TLS for workers).
    pub fn with_client_cert(mut self) -> Self {
        self.require_client_cert = true;
        self
    }

    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        if self.require_client_cert && request.peer_certs().is_none_or(|certs| certs.is_empty()) {
            return Err(Status::unauthenticated(
                "workers must present a client certificate signed by the coordinator's client CA (tls_cert and tls_key in the worker config)",
            ));
        }
        let Some(expected) = &self.token else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing `authorization: Bearer <token>`: pass the coordinator's token (--token or LORACTL_TOKEN)",
                )
            })?;
        if !constant_time_eq(given.as_bytes(), expected) {
            return Err(Status::unauthenticated("wrong token"));
        }
        Ok(request)
    }
}

/// Compares without an early exit, so timing does not reveal how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(header: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().expect("ascii header"));
        }
        request
    }

    #[test]
    fn tokens_are_checked() {
        let auth = BearerAuth::new(Some("s3cret"));
        assert!(auth.check(request(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer nope"),
            Some("s3cret"),
            Some("Bearer s3cre"),
        ] {
            let status = auth.check(request(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(BearerAuth::new(None).check(request(None)).is_ok());
    }
}
