//! The agent config template of the Kubernetes DaemonSet (deploy/kubernetes/agent.yaml), rendered
//! as its init container does (`@NODE_NAME@` → the node's name), parses and validates with the
//! real config types, and names the node's certificate.

use lifeboat_agent::config::Config;

#[test]
fn kubernetes_daemonset_config_template_renders_to_a_valid_config() {
    let yaml = include_str!("../../deploy/kubernetes/agent.yaml");
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != "agent.toml.template: |")
        .skip(1);
    let mut template = String::new();
    for l in lines.by_ref() {
        if !l.is_empty() && !l.starts_with("    ") {
            break;
        }
        template += l.strip_prefix("    ").unwrap_or("");
        template.push('\n');
    }
    assert!(
        template.contains("@NODE_NAME@"),
        "template found: {template}"
    );
    let cfg = Config::from_toml(&template.replace("@NODE_NAME@", "node-a.example"))
        .unwrap_or_else(|e| panic!("rendered template: {e}"));
    assert_eq!(cfg.agent_id, "node-a.example");
    assert_eq!(cfg.coordinators.len(), 3);
    assert!(cfg
        .tls
        .cert
        .as_ref()
        .is_some_and(|p| p.ends_with("node-a.example.pem")));
    assert!(cfg
        .paths
        .iter()
        .any(|p| p.path == std::path::Path::new("/srv/app")));
}
