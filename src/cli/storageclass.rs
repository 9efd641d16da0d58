//! StorageClasses as the CLI shows them (`get storageclasses`) and the parameters of the
//! commands that take `--storage-class` and `--parameter KEY=VALUE`.

use std::collections::BTreeMap;

use super::output::{self, ListOutput};
use crate::error::{Error, Result};
use crate::storageclass::StorageClass;

pub(super) async fn get_storage_classes(server: &str, output: Option<ListOutput>) -> Result<()> {
    let list: Vec<StorageClass> = super::api::get(server, "v1/storageclasses").await?;
    if output::print_records(&list, output)? {
        return Ok(());
    }
    crate::outln!("{:<40} {:<24} PARAMETERS", "NAME", "PROVISIONER");
    for sc in list {
        crate::outln!(
            "{:<40} {:<24} {}",
            sc.metadata.name,
            sc.provisioner,
            sc.parameters
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

async fn storage_class_parameters(server: &str, name: &str) -> Result<BTreeMap<String, String>> {
    let sc: StorageClass = super::api::get(server, &format!("v1/storageclasses/{name}")).await?;
    Ok(sc.parameters.into_iter().collect())
}

/// Splits `KEY=VALUE` at the first '=', so JSON values with '=' pass through.
pub fn parse_parameter(text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(Error::InvalidArgument(format!(
            "parameter {text:?} is not KEY=VALUE"
        ))),
    }
}

/// The parameters of a command: those of `storage_class` (read from the API) when given, then
/// each `--parameter KEY=VALUE` over them.
pub(super) async fn parameters(
    server: &str,
    storage_class: Option<&str>,
    given: &[String],
) -> Result<BTreeMap<String, String>> {
    let mut merged = BTreeMap::new();
    if let Some(sc) = storage_class {
        merged.extend(storage_class_parameters(server, sc).await?);
    }
    for p in given {
        let (k, v) = parse_parameter(p)?;
        merged.insert(k, v);
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_split_at_the_first_equals() {
        assert_eq!(
            parse_parameter("backingImageDataSourceParameters={\"url\":\"http://x/?a=b\"}")
                .unwrap(),
            (
                "backingImageDataSourceParameters".to_string(),
                "{\"url\":\"http://x/?a=b\"}".to_string()
            )
        );
        assert_eq!(
            parse_parameter("k=").unwrap(),
            ("k".to_string(), String::new())
        );
        assert!(parse_parameter("novalue").is_err());
        assert!(parse_parameter("=v").is_err());
    }
}
