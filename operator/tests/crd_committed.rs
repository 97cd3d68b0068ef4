//! The committed CRD must be exactly what the Rust types generate.

#[test]
fn committed_crd_matches_the_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/replicatedstatemachines.lockstep.dev.yaml"
    );
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = lockstep_operator::crd::crd_yaml().expect("CRD serializes");
    assert!(
        committed == generated,
        "crds/replicatedstatemachines.lockstep.dev.yaml is out of date with resource/src/types.rs.\n\
         Regenerate it with:\n\n    \
         cargo run -p lockstep-operator --bin crdgen > crds/replicatedstatemachines.lockstep.dev.yaml\n"
    );
}

#[test]
fn helm_chart_crd_matches_the_types() {
    // The chart templates the same CRD (with a keep policy): it must not drift either.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/lockstep/templates/crds/replicatedstatemachines.lockstep.dev.yaml"
    );
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = lockstep_operator::crd::crd_helm_yaml().expect("CRD serializes");
    assert!(
        committed == generated,
        "the Helm chart's CRD template is out of date with resource/src/types.rs.\n\
         Regenerate it with:\n\n    \
         cargo run -p lockstep-operator --bin crdgen -- --helm > charts/lockstep/templates/crds/replicatedstatemachines.lockstep.dev.yaml\n"
    );
}

/// Functions of the CEL environment of a Kubernetes 1.28 API server for CRD validation rules:
/// the CEL standard definitions and macros, plus the Kubernetes libraries that 1.28 compiles
/// rules with (lists, regex, url, extended strings). `quantity`/`isQuantity` (1.29), `ip`,
/// `cidr` (1.30/1.31), `format` (1.31), `semver` (1.33) and optional types are not there.
const CEL_1_28: &[&str] = &[
    // standard definitions and macros
    "size",
    "has",
    "matches",
    "contains",
    "startsWith",
    "endsWith",
    "all",
    "exists",
    "exists_one",
    "map",
    "filter",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "bool",
    "type",
    "dyn",
    "duration",
    "timestamp",
    "getDate",
    "getDayOfMonth",
    "getDayOfWeek",
    "getDayOfYear",
    "getFullYear",
    "getHours",
    "getMilliseconds",
    "getMinutes",
    "getMonth",
    "getSeconds",
    // Kubernetes lists library
    "isSorted",
    "sum",
    "min",
    "max",
    "indexOf",
    "lastIndexOf",
    // Kubernetes regex library
    "find",
    "findAll",
    // Kubernetes URL library
    "url",
    "isURL",
    "getScheme",
    "getHost",
    "getHostname",
    "getPort",
    "getEscapedPath",
    "getQuery",
    // extended strings
    "charAt",
    "lowerAscii",
    "upperAscii",
    "replace",
    "split",
    "substring",
    "trim",
    "join",
];

/// The CEL of every `x-kubernetes-validations` entry in `v` (rules and message expressions).
fn cel_expressions(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::Array(rules)) = m.get("x-kubernetes-validations") {
                for r in rules {
                    for field in ["rule", "messageExpression"] {
                        if let Some(s) = r.get(field).and_then(|s| s.as_str()) {
                            out.push(s.to_string());
                        }
                    }
                }
            }
            m.values().for_each(|x| cel_expressions(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| cel_expressions(x, out)),
        _ => {}
    }
}

/// `expr` without its string literals (a regex's `(` is not a call).
fn without_strings(expr: &str) -> String {
    let mut out = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                    out.push(c);
                }
            }
            None => {
                if c == '\'' || c == '"' {
                    quote = Some(c);
                }
                out.push(c);
            }
        }
    }
    out
}

/// Names called in `expr` (an identifier directly followed by `(`).
fn calls(expr: &str) -> Vec<String> {
    let code = without_strings(expr);
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            if chars.get(i) == Some(&'(') {
                out.push(chars[start..i].iter().collect());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Problems a 1.28 API server would refuse `expr` for.
fn not_in_1_28(expr: &str) -> Vec<String> {
    let code = without_strings(expr);
    let mut problems: Vec<String> = calls(expr)
        .into_iter()
        .filter(|f| !CEL_1_28.contains(&f.as_str()))
        .map(|f| format!("{f}() is not in the 1.28 CEL library"))
        .collect();
    if code.contains("?.") || code.contains(".?") || code.contains("[?") {
        problems.push("optional types (?. .? [?]) are not available before 1.29".into());
    }
    problems
}

#[test]
fn cel_rules_compile_on_kubernetes_1_28() {
    let crd = serde_json::to_value(<lockstep_resource::ReplicatedStateMachine as kube::CustomResourceExt>::crd())
        .expect("CRD serializes");
    let mut exprs = Vec::new();
    cel_expressions(&crd, &mut exprs);
    assert!(exprs.len() >= 10, "found the rules: {exprs:#?}");
    let bad: Vec<String> = exprs
        .iter()
        .flat_map(|e| not_in_1_28(e).into_iter().map(move |p| format!("{p}: {e}")))
        .collect();
    assert!(
        bad.is_empty(),
        "CEL rules that a Kubernetes 1.28 API server refuses (the minimum we support):\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_1_28_check_catches_newer_functions() {
    // The check itself must be able to fail.
    assert!(!not_in_1_28("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").is_empty());
    assert!(!not_in_1_28("self.?spec.orValue(1) > 0").is_empty());
    assert!(!not_in_1_28("isCIDR(self) || ip(self).family() == 4").is_empty());
    assert!(not_in_1_28("size(self) <= 64 && self.matches('^(a|b)$')").is_empty());
}
