//! Inputs the fuzz targets in fuzz/ found, each with the clear answer it gets now.
//! docs/FUZZING.md records the runs that found them.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use sotto::control::{answer, bind, connect_raw, serve, socket_path, Handler, RpcError, INVALID_REQUEST, METHOD_NOT_FOUND};
use sotto::exit::ExitClass;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A handler that knows no method: the requests below never reach one.
struct NoMethods;

impl Handler for NoMethods {
    async fn call(&self, method: String, _params: Value) -> Result<Value, RpcError> {
        Err(RpcError { code: METHOD_NOT_FOUND, message: format!("no method {method:?}"), exit: ExitClass::Usage })
    }
}

/// control_rpc, 2026-11-21: a request whose id is an object (and that has no method)
/// was answered with that object as the id. JSON-RPC 2.0 allows only a number, a string
/// or null, and requires null when the request's id cannot be used.
#[tokio::test]
async fn an_id_that_is_not_a_number_or_string_is_answered_with_null() {
    let found: &[u8] = concat!(
        "{\"jsonrpc\": \"2.0\", \"id\": {",
        "\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t",
        "\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t",
        "}}\n"
    )
    .as_bytes();
    assert_eq!(found.len(), 92);
    let v = answer(&NoMethods, found).await.expect("an invalid request is answered");
    assert_eq!(v["id"], Value::Null);
    assert_eq!(v["error"]["code"], INVALID_REQUEST);
    assert_eq!(v["error"]["message"], "no method");

    // Every invalid-request path, with every id that is not a number or a string.
    for id in [json!({}), json!([1]), json!(true), json!({"a": 1})] {
        for request in [
            json!({ "jsonrpc": "2.0", "id": id }),
            json!({ "jsonrpc": "1.0", "id": id, "method": "status" }),
            json!({ "jsonrpc": "2.0", "id": id, "method": "status" }),
        ] {
            let v = answer(&NoMethods, request.to_string().as_bytes()).await.expect("answered");
            assert_eq!((&v["id"], &v["error"]["code"]), (&Value::Null, &json!(INVALID_REQUEST)), "{request}");
        }
    }
    // Valid ids still come back as they were sent.
    for id in [json!(7), json!("seven")] {
        let v = answer(&NoMethods, json!({ "jsonrpc": "2.0", "id": id }).to_string().as_bytes()).await.expect("answered");
        assert_eq!((&v["id"], &v["error"]["code"]), (&id, &json!(INVALID_REQUEST)));
    }
}

/// The same for `subscribe`, which the connection loop serves itself: an object id makes
/// it an invalid request, answered with null, and no subscription.
#[tokio::test]
async fn subscribe_with_an_object_id_is_an_invalid_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir.path().join("run"), Path::new("/some/profile"));
    let server = tokio::spawn(serve(bind(&path).await.unwrap(), Arc::new(NoMethods)));
    let (read, mut write) = connect_raw(&path).await.expect("connects").into_split();
    let mut lines = BufReader::new(read).lines();
    let mut ask = async |line: &str| {
        write.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        serde_json::from_str::<Value>(&lines.next_line().await.unwrap().expect("an answer")).unwrap()
    };
    let v = ask(r#"{"jsonrpc":"2.0","id":{"x":1},"method":"subscribe"}"#).await;
    assert_eq!((&v["id"], &v["error"]["code"]), (&Value::Null, &json!(INVALID_REQUEST)), "{v}");
    let v = ask(r#"{"jsonrpc":"2.0","id":3,"method":"subscribe"}"#).await;
    assert_eq!((&v["id"], &v["result"]), (&json!(3), &json!({ "subscribed": false })), "{v}");
    server.abort();
}
