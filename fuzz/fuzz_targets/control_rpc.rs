//! The control socket's JSON-RPC layer (src/control.rs `answer`, src/app.rs `Call`):
//! one request line in, at most one answer out, served by a handler that decodes the
//! params exactly as the running node does and needs nothing live. Checks the shape of
//! every answer, that notifications get none, and what each method's params decode to.

#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use sotto::app::{Call, DEFAULT_HISTORY};
use sotto::control::{answer, Handler, RpcError, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR};
use sotto::exit::ExitClass;
use sotto::username::Username;
use sotto_fuzz::{assert_canonical, peak_heap};

const METHODS: [&str; 7] = ["status", "send", "history", "contacts", "online", "lookup", "contact.verify"];

/// Answers with the decoded call, after checking it against the params.
struct Offline;

impl Handler for Offline {
    async fn call(&self, method: String, params: Value) -> Result<Value, RpcError> {
        let call = match Call::parse(&method, &params) {
            Ok(call) => call,
            Err(e) => {
                assert_eq!(e.exit, ExitClass::Usage);
                if METHODS.contains(&method.as_str()) {
                    assert_eq!(e.code, INVALID_PARAMS, "{method}: {}", e.message);
                } else {
                    assert_eq!(e.code, METHOD_NOT_FOUND, "{method}: {}", e.message);
                }
                return Err(e);
            }
        };
        check_call(&method, &params, &call);
        Ok(json!({ "call": format!("{call:?}") }))
    }
}

fn user_in(params: &Value, name: &str) -> Username {
    let text = params[name].as_str().unwrap_or_else(|| panic!("{name} decoded from a non-string {}", params[name]));
    let user = Username::parse(text).expect("decoded from an invalid name");
    assert_canonical(&user);
    user
}

fn check_call(method: &str, params: &Value, call: &Call) {
    match call {
        Call::Status => assert_eq!(method, "status"),
        Call::Contacts => assert_eq!(method, "contacts"),
        Call::Online => assert_eq!(method, "online"),
        Call::Send { to, body } => {
            assert_eq!(method, "send");
            assert_eq!(&user_in(params, "to"), to);
            assert_eq!(params["body"].as_str(), Some(body.as_str()));
        }
        Call::History { peer, limit } => {
            assert_eq!(method, "history");
            assert!(*limit >= 1);
            match params.get("limit") {
                None | Some(Value::Null) => assert_eq!(*limit, DEFAULT_HISTORY),
                Some(v) => assert_eq!(v.as_u64(), Some(*limit as u64)),
            }
            match params.get("peer") {
                None | Some(Value::Null) => assert!(peer.is_none()),
                Some(_) => assert_eq!(peer.as_ref(), Some(&user_in(params, "peer"))),
            }
        }
        Call::Lookup { user } => {
            assert_eq!(method, "lookup");
            assert_eq!(&user_in(params, "user"), user);
        }
        Call::Verify { user, safety_number } => {
            assert_eq!(method, "contact.verify");
            assert_eq!(&user_in(params, "user"), user);
            assert_eq!(params.get("safety_number").and_then(Value::as_str), safety_number.as_deref());
        }
    }
}

/// Runs a future that never waits: the handler above does nothing asynchronous.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("answering one line waited"),
    }
}

fuzz_target!(|line: &[u8]| {
    let (response, heap) = peak_heap(|| now(answer(&Offline, line)));
    // The parsed request, its params copied once, and an answer that may quote the method.
    assert!(heap <= 96 * line.len() + 64 * 1024, "answering {} bytes held {heap} bytes", line.len());
    let request: Option<Value> = serde_json::from_slice(line).ok();
    let Some(response) = response else {
        // Only a well-formed notification goes unanswered.
        let request = request.expect("a line that is not JSON got no answer");
        assert_eq!(request.get("jsonrpc").and_then(Value::as_str), Some("2.0"));
        assert!(request.get("method").is_some_and(Value::is_string));
        assert!(request.get("id").is_none(), "a request with an id got no answer");
        return;
    };
    assert_eq!(response["jsonrpc"], "2.0");
    let id = &response["id"];
    assert!(id.is_null() || id.is_number() || id.is_string(), "answered with id {id}");
    match (response.get("result"), response.get("error")) {
        (Some(result), None) => {
            assert!(result["call"].is_string());
            let request = request.expect("a result for a line that is not JSON");
            assert!(METHODS.contains(&request["method"].as_str().expect("a result for a request without a method")));
            assert_eq!(&request["id"], id);
        }
        (None, Some(error)) => {
            let code = error["code"].as_i64().expect("numeric error code");
            assert!([PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS].contains(&code), "code {code}");
            assert_eq!(error["data"]["exit"], ExitClass::Usage as u8);
            assert!(error["message"].is_string());
            if request.is_none() {
                assert_eq!(code, PARSE_ERROR);
                assert!(id.is_null());
            }
        }
        _ => panic!("an answer needs exactly one of result and error: {response}"),
    }
});
