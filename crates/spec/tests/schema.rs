//! json_schema() describes the file format.

use dozen_spec::json_schema;

#[test]
fn schema_has_services() {
    let s = json_schema();
    assert!(s.is_object());
    let props = s["properties"].as_object().expect("properties");
    assert!(props.contains_key("services"));
    assert!(props.contains_key("name"));
    assert!(props.contains_key("env"));
    let required = s["required"].as_array().unwrap();
    assert!(required.iter().any(|r| r == "name"));
    let service = &s["definitions"]["ServiceFile"]["properties"];
    for k in [
        "command",
        "image",
        "replicas",
        "health",
        "routes",
        "resources",
        "stop_timeout",
    ] {
        assert!(service.get(k).is_some(), "{k} missing from {service}");
    }
    assert_eq!(
        s["definitions"]["ServiceFile"]["additionalProperties"],
        false
    );
}
