//! A stand-in Kubernetes API for the unit tests of a fetch step: a `kube::Client` over a function from a
//! request's method and path to a status and a JSON body, recording every request it answers.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

/// An `Api<Secret>` in namespace `mail`, and the requests it answered (`"GET /api/v1/..."`).
pub struct Stub {
    pub api: Api<Secret>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Stub {
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The requests that would have changed something.
    pub fn writes(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| !r.starts_with("GET "))
            .collect()
    }
}

/// How the stand-in answers a request: its method and path to a status and a JSON body.
pub type Answer = fn(&http::Method, &str) -> (u16, serde_json::Value);

pub fn secrets(answer: Answer) -> Stub {
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let path = req.uri().path().to_owned();
        if let Ok(mut r) = seen.lock() {
            r.push(format!("{} {path}", req.method()));
        }
        let (status, body) = answer(req.method(), &path);
        async move {
            let body = serde_json::to_vec(&body).expect("JSON");
            http::Response::builder()
                .status(status)
                .body(kube::client::Body::from(body))
        }
    });
    Stub {
        api: Api::namespaced(kube::Client::new(service, "mail"), "mail"),
        requests,
    }
}

/// The body of an API error.
pub fn status(code: u16, reason: &str) -> serde_json::Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": reason, "reason": reason, "code": code})
}

/// A Secret as the API server returns it (`data` base64-encoded).
pub fn secret(name: &str, data: &[(&str, &[u8])]) -> serde_json::Value {
    use base64::Engine;
    let data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| {
            let v = base64::engine::general_purpose::STANDARD.encode(v);
            (k.to_string(), serde_json::Value::String(v))
        })
        .collect();
    serde_json::json!({"kind": "Secret", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "mail"}, "data": data})
}
