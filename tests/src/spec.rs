//! Minimal job specs for control-plane tests: valid, small, and naming a base model and a
//! dataset folder that only matter to a worker that checks them.

/// A job spec named `name` on base model `model` (a file name or path), dataset folder
/// `train` at 512 px, one epoch; `more` is appended (e.g. [`resources`]).
pub fn job_spec(name: &str, model: &str, more: &str) -> String {
    format!(
        r#"
name = "{name}"
[model]
pretrained_model_name_or_path = "{model}"
[dataset]
train_data_dir = "train"
resolution = "512"
[training]
max_train_epochs = 1
{more}"#
    )
}

/// A `[resources]` table: the GPUs (`"all"`, `"cpu"`, `"0,2"`) and the restarts allowed.
pub fn resources(gpus: &str, max_restarts: u32) -> String {
    format!("[resources]\ngpus = \"{gpus}\"\nmax_restarts = {max_restarts}\n")
}
