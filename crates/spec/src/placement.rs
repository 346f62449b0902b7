//! Where a service's tasks may run: `node = "n2"` (that node only) and `node_labels =
//! { disk = "ssd" }` (nodes whose agents were started with those labels).

use crate::node::{Entry, Val};
use crate::types::Service;
use crate::units::check_name;
use crate::validate::Validator;

/// `node = "NAME"`.
pub(crate) fn node(v: &mut Validator, e: &Entry, svc: &mut Service) {
    match &e.node.val {
        Val::Str(name) => match check_name(name, "node") {
            Ok(()) => svc.node = Some(name.clone()),
            Err((message, hint)) => v.err(e.node.loc, message, hint),
        },
        other => v.err(
            e.node.loc,
            format!("`node` must be a node name, found {}", other.type_name()),
            "for example `node = \"n2\"` (`dozen nodes` lists them)",
        ),
    }
}

/// `node_labels = { KEY = "VALUE", ... }`.
pub(crate) fn labels(v: &mut Validator, e: &Entry, svc: &mut Service) {
    let Val::Table(entries) = &e.node.val else {
        v.err(
            e.node.loc,
            format!(
                "`node_labels` must be a table of labels, found {}",
                e.node.val.type_name()
            ),
            "for example `node_labels = { disk = \"ssd\" }`",
        );
        return;
    };
    for label in entries {
        match &label.node.val {
            Val::Str(value) => {
                svc.node_labels.insert(label.key.clone(), value.clone());
            }
            other => v.err(
                label.node.loc,
                format!(
                    "label `{}` must be a string, found {}",
                    label.key,
                    other.type_name()
                ),
                format!("quote it, e.g. `{} = \"ssd\"`", label.key),
            ),
        }
    }
}
