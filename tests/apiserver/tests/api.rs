#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The API server over HTTP: verbs, error shapes, watches, patches, the status subresource,
//! validation, garbage collection, tokens and discovery.

mod common;

use std::time::Duration;

use common::{APPLY, Api, JSON_PATCH, MERGE, STRATEGIC};
use http::Method;
use serde_json::{Value, json};

const ROUTES: &str = "/apis/bulwark.dev/v1alpha1/namespaces/default/llmroutes";
const CONFIG_MAPS: &str = "/api/v1/namespaces/default/configmaps";

fn route(name: &str) -> Value {
    json!({
        "apiVersion": "bulwark.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": name},
        "spec": {"rules": [{"backends": [{"name": "a", "url": "http://a"}]}]},
    })
}

fn config_map(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})
}

fn rv(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap()
}

fn names(list: &Value) -> Vec<&str> {
    list["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn crud_with_kubernetes_error_shapes() {
    let api = Api::start().await;
    let created = api.post(CONFIG_MAPS, config_map("app", json!({}))).await;
    assert_eq!(created.code, 201);
    let meta = &created.body["metadata"];
    assert_eq!(meta["namespace"], "default");
    assert_eq!(meta["uid"].as_str().unwrap().len(), 36);
    assert!(meta["creationTimestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(meta["managedFields"][0]["manager"], "api-test");

    let duplicate = api.post(CONFIG_MAPS, config_map("app", json!({}))).await;
    assert_eq!(duplicate.code, 409);
    assert_eq!(
        duplicate.body,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "configmaps \"app\" already exists", "reason": "AlreadyExists",
            "details": {"name": "app", "kind": "configmaps"}, "code": 409})
    );
    let missing = api.get(&format!("{ROUTES}/nope")).await;
    assert_eq!(missing.code, 404);
    assert_eq!(
        missing.body,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "llmroutes.bulwark.dev \"nope\" not found", "reason": "NotFound",
            "details": {"name": "nope", "group": "bulwark.dev", "kind": "llmroutes"}, "code": 404})
    );

    let mut update = created.body.clone();
    update["data"]["k"] = json!("w");
    let updated = api.put(&format!("{CONFIG_MAPS}/app"), update.clone()).await;
    assert_eq!(updated.code, 200);
    assert!(rv(&updated.body) > rv(&created.body));
    let stale = api.put(&format!("{CONFIG_MAPS}/app"), update).await;
    assert_eq!(stale.code, 409);
    assert_eq!(stale.body["reason"], "Conflict");
    assert_eq!(
        stale.body["message"],
        "Operation cannot be fulfilled on configmaps \"app\": the object has been modified; please apply your changes to the latest version and try again"
    );
    let unchanged = api.put(&format!("{CONFIG_MAPS}/app"), updated.body.clone()).await;
    assert_eq!(unchanged.code, 200);
    assert_eq!(rv(&unchanged.body), rv(&updated.body), "a write that changes nothing keeps the version");

    let generated = api.post(CONFIG_MAPS, json!({"metadata": {"generateName": "gen-"}})).await;
    assert_eq!(generated.code, 201);
    assert!(generated.body["metadata"]["name"].as_str().unwrap().starts_with("gen-"));
    let nameless = api.post(CONFIG_MAPS, json!({"metadata": {}})).await;
    assert_eq!((nameless.code, nameless.body["reason"].as_str()), (422, Some("Invalid")));

    let elsewhere = api.post("/api/v1/namespaces/other/configmaps", config_map("app", json!({}))).await;
    assert_eq!(elsewhere.code, 201);
    assert_eq!(api.get("/api/v1/namespaces/other").await.code, 200, "namespaces are created on demand");
    assert_eq!(
        names(&api.get("/api/v1/configmaps").await.body),
        vec!["app", generated.body["metadata"]["name"].as_str().unwrap(), "app"]
    );
    assert_eq!(names(&api.get(CONFIG_MAPS).await.body).len(), 2);

    let deleted = api.delete(&format!("{CONFIG_MAPS}/app")).await;
    assert_eq!(deleted.code, 200);
    assert_eq!(deleted.body["status"], "Success");
    assert_eq!(api.get(&format!("{CONFIG_MAPS}/app")).await.code, 404);
    assert_eq!(api.delete(&format!("{CONFIG_MAPS}/app")).await.code, 404);

    assert_eq!(api.get("/api/v1/widgets").await.code, 404);
    let not_allowed = api.send(Method::POST, "/api/v1/namespaces/default/configmaps/x", "application/json", "{}").await;
    assert_eq!((not_allowed.code, not_allowed.body["reason"].as_str()), (405, Some("MethodNotAllowed")));
    let yaml = api.send(Method::POST, CONFIG_MAPS, "application/yaml", "metadata: {name: from-yaml}\n").await;
    assert_eq!(yaml.code, 201);
    api.server.shutdown().await;
}

#[tokio::test]
async fn label_and_field_selectors() {
    let api = Api::start().await;
    api.post(CONFIG_MAPS, config_map("web", json!({"app": "web", "tier": "front"}))).await;
    api.post(CONFIG_MAPS, config_map("db", json!({"app": "db", "tier": "back"}))).await;
    api.post(CONFIG_MAPS, config_map("bare", json!({}))).await;
    let select = |query: &'static str| {
        let api = &api;
        async move { names(&api.get(&format!("{CONFIG_MAPS}?{query}")).await.body).join(",") }
    };
    assert_eq!(select("labelSelector=app%3Dweb").await, "web");
    assert_eq!(select("labelSelector=app==db").await, "db");
    assert_eq!(select("labelSelector=app!%3Dweb").await, "bare,db");
    assert_eq!(select("labelSelector=app+in+(web,db)").await, "db,web");
    assert_eq!(select("labelSelector=app%20notin%20(web)").await, "bare,db");
    assert_eq!(select("labelSelector=tier").await, "db,web");
    assert_eq!(select("labelSelector=!tier").await, "bare");
    assert_eq!(select("labelSelector=tier,app!=db").await, "web");
    assert_eq!(select("fieldSelector=metadata.name%3Dbare").await, "bare");
    assert_eq!(select("fieldSelector=metadata.namespace!=default").await, "");
    assert_eq!(select("limit=1").await, "bare,db,web", "limit may return everything");
    assert_eq!(api.get(&format!("{CONFIG_MAPS}?labelSelector=app+in+web")).await.code, 400);
}

#[tokio::test]
async fn watches_replay_from_a_resource_version_and_expire() {
    let api = Api::start().await;
    let first = api.post(CONFIG_MAPS, config_map("a", json!({}))).await.body;
    let since = rv(&first);
    api.post(CONFIG_MAPS, config_map("b", json!({}))).await;
    api.patch(&format!("{CONFIG_MAPS}/a"), MERGE, json!({"data": {"k": "changed"}})).await;
    api.delete(&format!("{CONFIG_MAPS}/b")).await;
    api.post("/api/v1/namespaces/other/configmaps", config_map("elsewhere", json!({}))).await;

    let mut replay = api.watch(&format!("{CONFIG_MAPS}?watch=true&resourceVersion={since}")).await;
    assert_eq!(replay.next_named().await, ("ADDED".into(), "b".into()));
    let modified = replay.next().await;
    assert_eq!(
        (modified["type"].as_str(), modified["object"]["data"]["k"].as_str()),
        (Some("MODIFIED"), Some("changed"))
    );
    assert_eq!(replay.next_named().await, ("DELETED".into(), "b".into()));
    api.post(CONFIG_MAPS, config_map("c", json!({}))).await;
    assert_eq!(replay.next_named().await, ("ADDED".into(), "c".into()), "live events follow the replay");

    let mut current = api.watch(&format!("{CONFIG_MAPS}?watch=1")).await;
    assert_eq!(current.next_named().await, ("ADDED".into(), "a".into()));
    assert_eq!(current.next_named().await, ("ADDED".into(), "c".into()));
    assert!(current.next_within(Duration::from_millis(200)).await.is_none());
    api.server.drop_watches();
    let dropped_at = tokio::time::Instant::now();
    assert!(current.next_within(Duration::from_secs(5)).await.is_none());
    assert!(dropped_at.elapsed() < Duration::from_secs(2), "dropping watches ends open streams");

    api.server.compact_watch_history();
    let mut expired = api.watch(&format!("{CONFIG_MAPS}?watch=true&resourceVersion={since}")).await;
    let error = expired.next().await;
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["kind"], "Status");
    assert_eq!(error["object"]["code"], 410);
    assert!(expired.next_within(Duration::from_secs(1)).await.is_none(), "the stream ends after the error");

    let list = api.get(CONFIG_MAPS).await.body;
    let list_rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let mut selected = api
        .watch(&format!(
            "{CONFIG_MAPS}?watch=true&resourceVersion={list_rv}&labelSelector=team%3Dx&allowWatchBookmarks=true"
        ))
        .await;
    api.patch(&format!("{CONFIG_MAPS}/a"), MERGE, json!({"metadata": {"labels": {"team": "x"}}})).await;
    assert_eq!(selected.next_named().await, ("ADDED".into(), "a".into()), "starting to match is an addition");
    api.patch(&format!("{CONFIG_MAPS}/a"), MERGE, json!({"data": {"k": "again"}})).await;
    assert_eq!(selected.next_named().await, ("MODIFIED".into(), "a".into()));
    api.patch(&format!("{CONFIG_MAPS}/a"), MERGE, json!({"metadata": {"labels": {"team": null}}})).await;
    assert_eq!(selected.next_named().await, ("DELETED".into(), "a".into()), "ceasing to match is a deletion");

    let mut short = api.watch(&format!("{CONFIG_MAPS}?watch=true&resourceVersion={list_rv}&timeoutSeconds=1")).await;
    while short.next_within(Duration::from_secs(3)).await.is_some() {}
    let mut initial = api.watch(&format!("{CONFIG_MAPS}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion={list_rv}")).await;
    assert_eq!(initial.next_named().await.0, "ADDED");
    assert_eq!(initial.next_named().await.0, "ADDED");
    let end = initial.next().await;
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
}

#[tokio::test]
async fn watches_stream_over_h2c() {
    let api = Api::start_h2c().await;
    let mut watch = api.watch(&format!("{ROUTES}?watch=true")).await;
    assert_eq!(api.post(ROUTES, route("r")).await.code, 201);
    assert_eq!(watch.next_named().await, ("ADDED".into(), "r".into()));
    assert_eq!(api.delete(&format!("{ROUTES}/r")).await.code, 200);
    assert_eq!(watch.next_named().await, ("DELETED".into(), "r".into()));
}

#[tokio::test]
async fn merge_json_and_strategic_patches() {
    let api = Api::start().await;
    api.post(CONFIG_MAPS, config_map("cm", json!({"a": "1"}))).await;
    let path = format!("{CONFIG_MAPS}/cm");
    let merged =
        api.patch(&path, MERGE, json!({"metadata": {"labels": {"a": null, "b": "2"}}, "data": {"x": "y"}})).await;
    assert_eq!(merged.code, 200);
    assert_eq!(merged.body["metadata"]["labels"], json!({"b": "2"}));
    assert_eq!(merged.body["data"], json!({"k": "v", "x": "y"}));

    let patched = api
        .patch(
            &path,
            JSON_PATCH,
            json!([
                {"op": "test", "path": "/data/x", "value": "y"},
                {"op": "replace", "path": "/data/x", "value": "z"},
                {"op": "add", "path": "/metadata/finalizers", "value": ["keep"]},
            ]),
        )
        .await;
    assert_eq!(patched.code, 200);
    assert_eq!(
        (patched.body["data"]["x"].as_str(), patched.body["metadata"]["finalizers"][0].as_str()),
        (Some("z"), Some("keep"))
    );
    let failed = api.patch(&path, JSON_PATCH, json!([{"op": "test", "path": "/data/x", "value": "nope"}])).await;
    assert_eq!((failed.code, failed.body["reason"].as_str()), (422, Some("Invalid")));
    let stale = api.patch(&path, MERGE, json!({"metadata": {"resourceVersion": "1"}, "data": {"x": "w"}})).await;
    assert_eq!(stale.code, 409);

    let strategic =
        api.patch(&path, STRATEGIC, json!({"metadata": {"finalizers": ["more"]}, "data": {"k": null}})).await;
    assert_eq!(strategic.code, 200);
    assert_eq!(strategic.body["metadata"]["finalizers"], json!(["keep", "more"]));
    assert!(strategic.body["data"].get("k").is_none());

    api.post(ROUTES, route("r")).await;
    let refused = api.patch(&format!("{ROUTES}/r"), STRATEGIC, json!({"spec": {}})).await;
    assert_eq!((refused.code, refused.body["reason"].as_str()), (415, Some("UnsupportedMediaType")));
    let missing = api.patch(&format!("{ROUTES}/none"), MERGE, json!({"spec": {}})).await;
    assert_eq!(missing.code, 404);
}

#[tokio::test]
async fn server_side_apply_creates_merges_and_tracks_managers() {
    let api = Api::start().await;
    let path = format!("{ROUTES}/applied");
    let config = route("applied");
    let created = api.patch(&format!("{path}?fieldManager=alice"), APPLY, config.clone()).await;
    assert_eq!(created.code, 201);
    let managed = &created.body["metadata"]["managedFields"][0];
    assert_eq!((managed["manager"].as_str(), managed["operation"].as_str()), (Some("alice"), Some("Apply")));
    assert_eq!(managed["fieldsV1"], json!({"f:spec": {"f:rules": {}}}));

    let again = api.patch(&format!("{path}?fieldManager=alice"), APPLY, config.clone()).await;
    assert_eq!((again.code, rv(&again.body)), (200, rv(&created.body)), "re-applying changes nothing");

    let yaml = "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata:\n  name: applied\n  labels: {team: bob}\n";
    let bob = api.send(Method::PATCH, &format!("{path}?fieldManager=bob"), APPLY, yaml).await;
    assert_eq!(bob.code, 200);
    assert_eq!(bob.body["metadata"]["labels"]["team"], "bob");
    assert_eq!(bob.body["spec"], config["spec"], "apply merges into the live object");
    assert_eq!(bob.body["metadata"]["generation"], 1, "labels are not the desired state");

    let mut rival = config.clone();
    rival["spec"]["rules"][0]["backends"][0]["url"] = json!("http://b");
    let conflict = api.patch(&format!("{path}?fieldManager=carol"), APPLY, rival.clone()).await;
    assert_eq!((conflict.code, conflict.body["reason"].as_str()), (409, Some("Conflict")));
    assert_eq!(
        conflict.body["message"],
        "Apply failed with 1 conflict: conflict with \"alice\" using bulwark.dev/v1alpha1: .spec.rules"
    );
    let forced = api.patch(&format!("{path}?fieldManager=carol&force=true"), APPLY, rival).await;
    assert_eq!(forced.code, 200);
    assert_eq!(forced.body["metadata"]["generation"], 2);
    let managers: Vec<&str> = forced.body["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    assert_eq!(managers, vec!["bob", "carol"], "alice lost her only field");

    let dropped = api
        .send(
            Method::PATCH,
            &format!("{path}?fieldManager=bob"),
            APPLY,
            "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata:\n  name: applied\n",
        )
        .await;
    assert!(dropped.body["metadata"].get("labels").is_none(), "fields a manager stops applying are removed");

    let anonymous = api.patch(&path, APPLY, config).await;
    assert_eq!(anonymous.code, 400);
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let api = Api::start().await;
    let mut body = route("r");
    body["status"] = json!({"observedGeneration": 7});
    let created = api.post(ROUTES, body).await.body;
    assert!(created.get("status").is_none(), "status is not set on create");
    assert_eq!(created["metadata"]["generation"], 1);

    let path = format!("{ROUTES}/r");
    let mut status_write = created.clone();
    status_write["status"] =
        json!({"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True", "reason": "Ok"}]});
    status_write["spec"]["rules"] = json!([]);
    let status = api.put(&format!("{path}/status"), status_write).await;
    assert_eq!(status.code, 200);
    assert_eq!(status.body["status"]["observedGeneration"], 1);
    assert_eq!(status.body["spec"], created["spec"], "a status write leaves the spec alone");
    assert_eq!(status.body["metadata"]["generation"], 1);

    let spec = api
        .patch(&path, MERGE, json!({"spec": {"workloadSelector": {"matchLabels": {"app": "x"}}}, "status": null}))
        .await;
    assert_eq!(spec.body["metadata"]["generation"], 2);
    assert_eq!(spec.body["status"]["observedGeneration"], 1, "a main-resource write leaves the status alone");

    let labels = api.patch(&path, MERGE, json!({"metadata": {"labels": {"a": "b"}}})).await;
    assert_eq!(labels.body["metadata"]["generation"], 2);
    assert!(rv(&labels.body) > rv(&spec.body));

    let applied = api
        .patch(
            &format!("{path}/status?fieldManager=operator&force=true"),
            APPLY,
            json!({
                "apiVersion": "bulwark.dev/v1alpha1", "kind": "LLMRoute", "metadata": {"name": "r"},
                "status": {"observedGeneration": 2}
            }),
        )
        .await;
    assert_eq!(applied.code, 200);
    assert_eq!(applied.body["status"]["observedGeneration"], 2);
    let entry = applied.body["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["manager"] == "operator")
        .unwrap()
        .clone();
    assert_eq!(entry["subresource"], "status");
    assert_eq!(api.get(&format!("{path}/status")).await.body["status"]["observedGeneration"], 2);
    assert_eq!(api.patch(&format!("{ROUTES}/none/status?fieldManager=x"), APPLY, json!({})).await.code, 404);
}

#[tokio::test]
async fn custom_resources_are_validated_against_their_schema() {
    let api = Api::start().await;
    let invalid = api
        .post(
            ROUTES,
            json!({"apiVersion": "bulwark.dev/v1alpha1", "kind": "LLMRoute", "metadata": {"name": "x"},
            "spec": {"rules": [{"backends": [{"url": "http://a", "weight": "heavy"}]}]}}),
        )
        .await;
    assert_eq!(invalid.code, 422);
    assert_eq!(invalid.body["reason"], "Invalid");
    assert_eq!(
        invalid.body["message"],
        "LLMRoute.bulwark.dev \"x\" is invalid: [spec.rules[0].backends[0].name: Required value, spec.rules[0].backends[0].weight: Invalid value: \"string\": spec.rules[0].backends[0].weight in body must be of type integer: \"string\"]"
    );
    assert_eq!(
        invalid.body["details"]["causes"][0],
        json!({"reason": "FieldValueRequired", "message": "Required value", "field": "spec.rules[0].backends[0].name"})
    );
    assert_eq!(invalid.body["details"]["kind"], "LLMRoute");

    let no_spec = api.post(ROUTES, json!({"metadata": {"name": "x"}})).await;
    assert_eq!(no_spec.body["message"], "LLMRoute.bulwark.dev \"x\" is invalid: spec: Required value");
    let bad_name = api.post(ROUTES, route("Upper")).await;
    assert_eq!(bad_name.body["details"]["causes"][0]["field"], "metadata.name");

    let mut unknown = route("x");
    unknown["spec"]["foo"] = json!(1);
    let strict = api.post(&format!("{ROUTES}?fieldValidation=Strict"), unknown.clone()).await;
    assert_eq!(strict.code, 400);
    assert_eq!(
        strict.body["message"],
        "LLMRoute in version \"v1alpha1\" cannot be handled as a LLMRoute: strict decoding error: unknown field \"spec.foo\""
    );
    let warned = api.post(ROUTES, unknown).await;
    assert_eq!(warned.code, 201);
    assert_eq!(warned.headers["warning"], "299 - \"unknown field \\\"spec.foo\\\"\"");
    assert!(warned.body["spec"].get("foo").is_none(), "unknown fields are pruned");
    let dry = api.post(&format!("{ROUTES}?dryRun=All"), route("dry")).await;
    assert_eq!(dry.code, 201);
    assert_eq!(api.get(&format!("{ROUTES}/dry")).await.code, 404);
}

#[tokio::test]
async fn finalizers_and_owner_reference_garbage_collection() {
    let api = Api::start().await;
    let owner = api.post(ROUTES, route("owner")).await.body;
    let other = api.post(ROUTES, route("other")).await.body;
    let reference = |owner: &Value| json!({"apiVersion": "bulwark.dev/v1alpha1", "kind": "LLMRoute", "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]});
    let owned = json!({"metadata": {"name": "owned", "ownerReferences": [reference(&owner)]}});
    let shared = json!({"metadata": {"name": "shared", "ownerReferences": [reference(&owner), reference(&other)]}});
    api.post(CONFIG_MAPS, owned).await;
    api.post(CONFIG_MAPS, shared).await;
    let child = api.post(CONFIG_MAPS, json!({"metadata": {"name": "grandchild", "ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owned", "uid": api.get(&format!("{CONFIG_MAPS}/owned")).await.body["metadata"]["uid"]}
    ]}})).await;
    assert_eq!(child.code, 201);

    let mut watch = api.watch(&format!("{CONFIG_MAPS}?watch=true&resourceVersion={}", rv(&child.body))).await;
    assert_eq!(api.delete(&format!("{ROUTES}/owner")).await.code, 200);
    assert_eq!(names(&api.get(CONFIG_MAPS).await.body), vec!["shared"]);
    assert_eq!(watch.next_named().await, ("DELETED".into(), "owned".into()));
    assert_eq!(watch.next_named().await, ("DELETED".into(), "grandchild".into()));

    let held = json!({"metadata": {"name": "held", "finalizers": ["bulwark.dev/cleanup"]}});
    api.post(CONFIG_MAPS, held).await;
    let pending = api.delete(&format!("{CONFIG_MAPS}/held")).await;
    assert_eq!(pending.code, 200);
    assert!(pending.body["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(watch.next_named().await, ("ADDED".into(), "held".into()));
    assert_eq!(watch.next_named().await, ("MODIFIED".into(), "held".into()));
    let still = api.get(&format!("{CONFIG_MAPS}/held")).await;
    assert_eq!(still.code, 200);
    let refused = api
        .patch(
            &format!("{CONFIG_MAPS}/held"),
            MERGE,
            json!({"metadata": {"finalizers": ["bulwark.dev/cleanup", "new"]}}),
        )
        .await;
    assert_eq!(refused.code, 422);
    let done = api
        .patch(&format!("{CONFIG_MAPS}/held"), JSON_PATCH, json!([{"op": "remove", "path": "/metadata/finalizers"}]))
        .await;
    assert_eq!(done.code, 200);
    assert_eq!(api.get(&format!("{CONFIG_MAPS}/held")).await.code, 404);
    assert_eq!(watch.next_named().await, ("DELETED".into(), "held".into()));

    api.post("/api/v1/namespaces/doomed/configmaps", config_map("inside", json!({}))).await;
    assert_eq!(api.delete("/api/v1/namespaces/doomed").await.code, 200);
    assert_eq!(api.get("/api/v1/namespaces/doomed/configmaps/inside").await.code, 404);
    assert_eq!(api.delete("/api/v1/namespaces/default").await.code, 403);
}

#[tokio::test]
async fn token_requests_and_reviews() {
    let api = Api::start().await;
    let sa = api.post("/api/v1/namespaces/default/serviceaccounts", json!({"metadata": {"name": "robot"}})).await.body;
    let pod = api
        .post(
            "/api/v1/namespaces/default/pods",
            json!({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
        )
        .await
        .body;
    let request = json!({"spec": {"audiences": ["bulwark"], "expirationSeconds": 3600,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": pod["metadata"]["uid"]}}});
    let issued = api.post("/api/v1/namespaces/default/serviceaccounts/robot/token", request).await;
    assert_eq!(issued.code, 201);
    assert_eq!(issued.body["kind"], "TokenRequest");
    let token = issued.body["status"]["token"].as_str().unwrap().to_string();
    assert!(issued.body["status"]["expirationTimestamp"].is_string());

    let review = |token: &str, audiences: Value| {
        let api = &api;
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, "audiences": audiences}});
        async move {
            let reply = api.post("/apis/authentication.k8s.io/v1/tokenreviews", body).await;
            assert_eq!(reply.code, 201);
            reply.body["status"].clone()
        }
    };
    let status = review(&token, json!(["bulwark", "other"])).await;
    assert_eq!(status["authenticated"], true);
    assert_eq!(status["audiences"], json!(["bulwark"]));
    let user = &status["user"];
    assert_eq!(user["username"], "system:serviceaccount:default:robot");
    assert_eq!(user["uid"], sa["metadata"]["uid"]);
    assert_eq!(
        user["groups"],
        json!(["system:serviceaccounts", "system:serviceaccounts:default", "system:authenticated"])
    );
    assert_eq!(user["extra"]["authentication.kubernetes.io/pod-name"], json!(["web"]));
    assert_eq!(user["extra"]["authentication.kubernetes.io/pod-uid"], json!([pod["metadata"]["uid"]]));

    let wrong_audience = review(&token, json!(["elsewhere"])).await;
    assert!(wrong_audience.get("authenticated").is_none());
    assert!(wrong_audience["error"].as_str().unwrap().contains("audiences"));
    assert!(review("made-up", json!([])).await["error"].is_string());

    let unbound = api.post("/api/v1/namespaces/default/serviceaccounts/robot/token", json!({"spec": {}})).await.body;
    let default_audience = review(unbound["status"]["token"].as_str().unwrap(), json!([])).await;
    assert_eq!(default_audience["authenticated"], true);
    assert!(default_audience["user"]["extra"].get("authentication.kubernetes.io/pod-name").is_none());

    api.delete("/api/v1/namespaces/default/pods/web").await;
    let after = review(&token, json!(["bulwark"])).await;
    assert!(after.get("authenticated").is_none());
    assert!(after["error"].as_str().unwrap().contains("deleted"));

    let elsewhere = api.post("/api/v1/namespaces/other/configmaps", config_map("c", json!({}))).await;
    assert_eq!(elsewhere.code, 201);
    let issued = api.post("/api/v1/namespaces/other/serviceaccounts/default/token", json!({})).await;
    assert_eq!(issued.code, 201, "every namespace has a default service account");

    let short = api
        .post("/api/v1/namespaces/default/serviceaccounts/robot/token", json!({"spec": {"expirationSeconds": 60}}))
        .await;
    assert_eq!(short.code, 422);
    assert_eq!(api.post("/api/v1/namespaces/default/serviceaccounts/ghost/token", json!({})).await.code, 404);
}

#[tokio::test]
async fn discovery_and_openapi() {
    let api = Api::start().await;
    assert_eq!(api.get("/version").await.body["major"], "1");
    assert_eq!(api.get("/api").await.body["versions"], json!(["v1"]));
    let core = api.get("/api/v1").await.body;
    let core_names: Vec<&str> =
        core["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    for name in [
        "namespaces",
        "pods",
        "pods/status",
        "configmaps",
        "secrets",
        "services",
        "serviceaccounts",
        "serviceaccounts/token",
        "events",
    ] {
        assert!(core_names.contains(&name), "{name} in {core_names:?}");
    }
    let groups = api.get("/apis").await.body;
    let group_names: Vec<&str> =
        groups["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    for group in
        ["apiextensions.k8s.io", "authentication.k8s.io", "coordination.k8s.io", "events.k8s.io", "bulwark.dev"]
    {
        assert!(group_names.contains(&group), "{group}");
    }
    let bulwark = api.get("/apis/bulwark.dev/v1alpha1").await.body;
    let llmroutes = bulwark["resources"].as_array().unwrap().iter().find(|r| r["name"] == "llmroutes").unwrap();
    assert_eq!(llmroutes["shortNames"], json!(["llmr"]));
    assert_eq!(llmroutes["kind"], "LLMRoute");
    assert_eq!(llmroutes["namespaced"], true);
    assert!(bulwark["resources"].as_array().unwrap().iter().any(|r| r["name"] == "llmroutes/status"));

    let index = api.get("/openapi/v3").await.body;
    let url = index["paths"]["apis/bulwark.dev/v1alpha1"]["serverRelativeURL"].as_str().unwrap().to_string();
    assert!(url.contains("?hash="));
    let document = api.get(&url).await.body;
    let schema = &document["components"]["schemas"]["dev.bulwark.v1alpha1.LLMRoute"];
    assert_eq!(
        schema["x-kubernetes-group-version-kind"],
        json!([{"group": "bulwark.dev", "version": "v1alpha1", "kind": "LLMRoute"}])
    );
    let patch = &document["paths"]["/apis/bulwark.dev/v1alpha1/namespaces/{namespace}/llmroutes/{name}"]["patch"];
    assert!(patch["parameters"].as_array().unwrap().iter().any(|p| p["name"] == "fieldValidation"));
    assert_eq!(api.get("/openapi/v3/api/v1").await.code, 200);
}

#[tokio::test]
async fn created_crds_are_served_until_deleted() {
    let api = Api::start().await;
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
            "scope": "Cluster",
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object", "properties": {"size": {"type": "integer"}}}}}}}],
        },
    });
    let created = api.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd).await;
    assert_eq!(created.code, 201);
    let conditions = created.body["status"]["conditions"].as_array().unwrap();
    assert!(conditions.iter().any(|c| c["type"] == "Established" && c["status"] == "True"));
    let widget =
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3}});
    assert_eq!(api.post("/apis/example.com/v1/widgets", widget).await.code, 201);
    assert_eq!(api.get("/apis/example.com/v1").await.body["resources"][0]["shortNames"], json!(["wd"]));
    let wrong =
        api.post("/apis/example.com/v1/widgets", json!({"metadata": {"name": "x"}, "spec": {"size": "big"}})).await;
    assert_eq!(wrong.code, 422);

    let invalid = api.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json!({
        "metadata": {"name": "things.example.com"},
        "spec": {"group": "example.com", "names": {"plural": "other", "kind": "Thing"}, "scope": "Namespaced", "versions": []},
    })).await;
    assert_eq!(invalid.code, 422);

    assert_eq!(
        api.delete("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com").await.code,
        200
    );
    assert_eq!(api.get("/apis/example.com/v1/widgets/w").await.code, 404);
    assert_eq!(api.get("/apis/example.com/v1").await.code, 404);
}
