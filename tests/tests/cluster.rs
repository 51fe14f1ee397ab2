//! A cluster of real processes on 127.0.0.1 — `loractl-coordinator` on a redb file,
//! `loractl-worker`s, jobs submitted, watched and fetched with `loractl` — through the
//! scenarios the control plane exists for: a job from a local dataset to a kohya LoRA file;
//! two jobs on two workers and a 2-GPU job waiting for a big enough worker; a worker and then
//! the coordinator killed with SIGKILL mid-run (on redb, and the leader of two on etcd); and
//! requests that must be refused without changing anything.

use std::collections::BTreeSet;
use std::path::Path;

use loractl_proto::pb;
use loractl_tests::{
    events, submitted_id, tiny_job, Background, Cluster, Etcd, Store, WorkerSetup,
};
use serde_json::Value;

const TOKEN: &str = "e2e-token";

/// LoRA file checks: kohya key names, alpha scalars, `ss_*` metadata.
fn assert_kohya_lora(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = tensors.names().into_iter().map(str::to_owned).collect();
    let downs: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".lora_down.weight"))
        .collect();
    assert!(!downs.is_empty(), "no lora_down weights in {names:?}");
    for down in &downs {
        let module = down.trim_end_matches(".lora_down.weight");
        assert!(
            names.contains(&format!("{module}.lora_up.weight")),
            "{module} has no lora_up"
        );
        assert!(
            names.contains(&format!("{module}.alpha")),
            "{module} has no alpha"
        );
        assert!(
            module.starts_with("lora_unet_") || module.starts_with("lora_te_"),
            "{module} is not a kohya module name"
        );
    }
    let meta = metadata.metadata().clone().unwrap_or_default();
    for key in ["ss_network_dim", "ss_network_alpha", "ss_network_module"] {
        assert!(meta.contains_key(key), "metadata lacks {key}: {meta:?}");
    }
    assert_eq!(meta["ss_network_dim"], "8");
}

fn state(job: &Value) -> &str {
    job["state"].as_str().unwrap_or("")
}

#[test]
fn a_job_submitted_from_a_local_dataset_trains_and_its_lora_is_fetched() {
    let mut cluster = Cluster::start(Some(TOKEN)).unwrap();
    // The sample prompts live in a folder the worker shares with this machine.
    let shared = cluster.path("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let prompts = shared.join("prompts.txt");
    std::fs::write(&prompts, "red square, shapes --w 64 --h 64 --s 2 --d 1\n").unwrap();
    let mut setup = WorkerSetup::cpu("solo");
    setup.data_dirs = vec![shared.clone()];
    cluster.add_worker(setup).unwrap();

    let job = tiny_job(
        &cluster.path("job"),
        "e2e",
        4,
        &format!(
            "[sample]\nsample_prompts = {}\nsample_every_n_steps = 4\n[logging]\nlogging_dir = \"logs\"\n",
            serde_json::to_string(&prompts.display().to_string()).unwrap()
        ),
    )
    .unwrap();
    let out = cluster.run(&["submit", job.to_str().unwrap(), "--watch"]);
    assert!(out.ok(), "{}\n{}", out.stderr, cluster.logs());
    let id = submitted_id(&out);
    assert!(out.stderr.contains("uploading dataset"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("{id}: succeeded")),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("step 4/4"), "{}", out.stderr);

    let done = cluster.job(&id).unwrap();
    assert_eq!(state(&done), "succeeded");
    assert_eq!(done["attempt"], 0);
    // The spec the coordinator holds names the uploaded dataset by its manifest digest.
    assert!(
        done["spec_toml"]
            .as_str()
            .unwrap()
            .contains("train_data_dir = \"sha256:"),
        "{}",
        done["spec_toml"]
    );

    let fetched = cluster.path("fetched");
    let files = cluster
        .json(&["fetch", &id, "--out", fetched.to_str().unwrap()])
        .unwrap();
    let kinds: BTreeSet<&str> = files
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["LoRA file", "sample image", "training log"]),
        "{files}"
    );
    assert_kohya_lora(&fetched.join("e2e.safetensors"));
    // Rank 0's TensorBoard log comes back with the LoRA, one loss per step.
    let log = std::fs::read_dir(&fetched)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("events.out.tfevents."))
        })
        .unwrap_or_else(|| panic!("no TensorBoard log in {files}"));
    let scalars = loractl_trainer::tensorboard::read(&log).unwrap().scalars;
    let steps: Vec<i64> = scalars
        .iter()
        .filter(|s| s.tag == "loss/current" && s.value.is_finite())
        .map(|s| s.step)
        .collect();
    assert_eq!(steps, [1, 2, 3, 4], "{scalars:?}");
    let png = std::fs::read_dir(&fetched)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "png"))
        .expect("a sample image was fetched");
    assert!(std::fs::metadata(png.path()).unwrap().len() > 0);
    // A second fetch finds everything in place.
    let again = cluster.run(&["fetch", &id, "--out", fetched.to_str().unwrap()]);
    assert!(
        again.ok() && again.stdout.contains("up to date"),
        "{again:?}"
    );

    let status = cluster.run(&["status", &id]);
    assert!(status.stdout.contains("succeeded"), "{status:?}");
    let logs = cluster.run(&["logs", &id]);
    assert!(logs.ok() && !logs.stdout.trim().is_empty(), "{logs:?}");
    let list = cluster.json(&["list"]).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    let workers = cluster.run(&["workers"]);
    assert!(
        workers.stdout.contains("solo") && workers.stdout.contains("alive"),
        "{workers:?}"
    );
}

/// A rank that reports one progress sample and holds its slot until the test creates
/// `$RELEASE/<job id>`.
const HOLD: &str = r#"
echo "rank of $LORACTL_JOB_ID on GPUs [$CUDA_VISIBLE_DEVICES]"
echo '@loractl {"progress":{"step":1,"total_steps":2,"loss":0.5,"lr":0.001}}'
while [ ! -e "$RELEASE/$LORACTL_JOB_ID" ]; do sleep 0.1; done
"#;

#[test]
fn two_workers_run_two_jobs_at_once_and_a_three_worker_job_waits_for_a_third_worker() {
    let mut cluster = Cluster::start(None).unwrap();
    let release = cluster.path("release");
    std::fs::create_dir_all(&release).unwrap();
    // Datasets the workers see in place (`--remote-data`); the scripts never read them.
    let datasets = cluster.path("datasets");
    let worker = |name: &'static str, gpus: u32| WorkerSetup {
        name,
        simulated_gpus: gpus,
        script: Some(HOLD),
        data_dirs: vec![datasets.clone()],
        env: vec![("RELEASE", release.display().to_string())],
        config: Vec::new(),
    };
    cluster.add_worker(worker("left", 1)).unwrap();
    cluster.add_worker(worker("right", 1)).unwrap();

    let model = loractl_trainer::demo::bundled_tiny_model();
    let submit = |name: &str, gpus: &str, workers: u32| {
        let dir = cluster.path(name);
        let data = datasets.join(name);
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        let job = dir.join("job.toml");
        std::fs::write(
            &job,
            format!(
                "name = \"{name}\"\n[model]\npretrained_model_name_or_path = {}\n\
                 [dataset]\ntrain_data_dir = {}\nresolution = \"64\"\n\
                 [training]\nmax_train_steps = 2\n[resources]\ngpus = \"{gpus}\"\n\
                 workers = {workers}\n",
                serde_json::to_string(&model.display().to_string()).unwrap(),
                serde_json::to_string(&data.display().to_string()).unwrap(),
            ),
        )
        .unwrap();
        cluster.run(&["submit", job.to_str().unwrap(), "--remote-data"])
    };
    let a = submitted_id(&submit("a", "all", 1));
    let b = submitted_id(&submit("b", "all", 1));
    let running: Vec<Value> = [&a, &b]
        .iter()
        .map(|id| cluster.wait_job(id, "running", |j| state(j) == "running"))
        .collect();
    let on: BTreeSet<&str> = running
        .iter()
        .map(|j| j["placement"][0]["worker_id"].as_str().unwrap())
        .collect();
    assert_eq!(on.len(), 2, "both jobs on one worker: {running:?}");
    let workers = cluster.json(&["workers"]).unwrap();
    for w in workers.as_array().unwrap() {
        assert_eq!(w["busy_gpus"], serde_json::json!([0]), "{workers}");
        assert_eq!(w["free_gpus"], serde_json::json!([]), "{workers}");
    }

    // A data-parallel job over three workers (one rank each) cannot start on two.
    let big_out = submit("big", "all", 3);
    let big = submitted_id(&big_out);
    // Both one-GPU jobs end; the two free workers still do not make three.
    for id in [&a, &b] {
        std::fs::write(release.join(id), "").unwrap();
        cluster.wait_job(id, "succeeded", |j| state(j) == "succeeded");
    }
    let waiting = cluster.job(&big).unwrap();
    assert_eq!(state(&waiting), "queued", "{waiting}");
    assert!(
        waiting["waiting_reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{waiting}"
    );
    let status = cluster.run(&["status", &big]);
    assert!(status.stdout.contains("waiting: "), "{}", status.stdout);

    cluster.add_worker(worker("third", 1)).unwrap();
    let placed = cluster.wait_job(&big, "running", |j| state(j) == "running");
    let on: BTreeSet<&str> = placed["placement"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["worker_id"].as_str())
        .collect();
    assert_eq!(on.len(), 3, "one rank on each worker: {placed}");
    assert!(on.iter().any(|w| w.starts_with("third")), "{placed}");
    std::fs::write(release.join(&big), "").unwrap();
    cluster.wait_job(&big, "succeeded", |j| state(j) == "succeeded");
}

#[test]
fn a_job_whose_worker_is_killed_resumes_from_its_checkpoint_on_another() {
    let mut cluster = Cluster::start(Some(TOKEN)).unwrap();
    cluster.add_worker(WorkerSetup::cpu("doomed")).unwrap();
    let job = tiny_job(&cluster.path("job"), "survivor", 10, "").unwrap();
    let id = submitted_id(&cluster.run(&["submit", job.to_str().unwrap()]));
    let mut watch = cluster.loractl();
    watch.args(["watch", &id, "--json"]);
    let watch = Background::spawn(watch);

    cluster.wait_job(&id, "a checkpoint stored", |j| {
        state(j) == "running" && !j["latest_checkpoint"].is_null()
    });
    cluster.add_worker(WorkerSetup::cpu("rescuer")).unwrap();
    cluster.kill_worker("doomed");

    let done = cluster.wait_job(&id, "the end", |j| {
        matches!(state(j), "succeeded" | "failed" | "cancelled")
    });
    assert_eq!(state(&done), "succeeded", "{done}\n{}", cluster.logs());
    assert_eq!(done["attempt"], 1);
    assert_eq!(done["counted_restarts"], 0, "a lost worker is not counted");
    assert_eq!(done["last_failure"]["kind"], "worker lost");
    assert!(done["placement"].as_array().is_some_and(Vec::is_empty));

    let out = watch.finish();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let steps = |attempt: u64| -> Vec<u64> {
        events(&out.stdout)
            .iter()
            .filter(|e| e["event"] == "progress" && e["progress"]["attempt"] == attempt)
            .filter_map(|e| e["progress"]["step"].as_u64())
            .collect()
    };
    let (first, second) = (steps(0), steps(1));
    assert!(
        !first.is_empty(),
        "no progress from attempt 0: {}",
        out.stdout
    );
    let resumed_at = second.iter().min().copied().unwrap_or(0);
    assert!(
        resumed_at > 2 && resumed_at <= first.iter().max().copied().unwrap_or(0) + 1,
        "attempt 1 started at step {resumed_at} after attempt 0 reached {first:?}"
    );
    assert_eq!(second.iter().max(), Some(&10));
    let fetched = cluster.path("fetched");
    let files = cluster
        .json(&["fetch", &id, "--out", fetched.to_str().unwrap()])
        .unwrap();
    assert!(!files.as_array().unwrap().is_empty());
    assert_kohya_lora(&fetched.join("survivor.safetensors"));
}

#[test]
fn a_coordinator_killed_mid_run_and_restarted_loses_no_job() {
    let mut cluster = Cluster::start(Some(TOKEN)).unwrap();
    cluster.add_worker(WorkerSetup::cpu("steady")).unwrap();
    let first = tiny_job(&cluster.path("first"), "first", 8, "").unwrap();
    let second = tiny_job(&cluster.path("second"), "second", 2, "").unwrap();
    let one = submitted_id(&cluster.run(&["submit", first.to_str().unwrap()]));
    // One CPU slot: the second job queues behind the first.
    let two = submitted_id(&cluster.run(&["submit", second.to_str().unwrap()]));
    let mut watch = cluster.loractl();
    watch.args(["watch", &one, "--json"]);
    let watch = Background::spawn(watch);
    cluster.wait_job(&one, "a checkpoint stored", |j| {
        state(j) == "running" && !j["latest_checkpoint"].is_null()
    });
    assert_eq!(state(&cluster.job(&two).unwrap()), "queued");
    let before = cluster.run(&["logs", &one]);
    assert!(
        before.ok() && !before.stdout.trim().is_empty(),
        "{before:?}"
    );

    cluster.kill_coordinator();
    cluster.start_coordinator().unwrap();

    let jobs = cluster.json(&["list"]).unwrap();
    let ids: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(ids, [one.as_str(), two.as_str()]);
    let mut attempts = Vec::new();
    for id in [&one, &two] {
        let done = cluster.wait_job(id, "the end", |j| {
            matches!(state(j), "succeeded" | "failed" | "cancelled")
        });
        assert_eq!(state(&done), "succeeded", "{done}\n{}", cluster.logs());
        attempts.push(done["attempt"].as_u64().unwrap());
    }
    let out = watch.finish();
    assert_eq!(out.code, Some(0), "{}\n{}", out.stderr, out.stdout);
    // The run went on (attempt 0), or a later attempt resumed after the stored checkpoint.
    let last_attempt = attempts[0];
    let resumed_at = events(&out.stdout)
        .iter()
        .filter(|e| e["event"] == "progress" && e["progress"]["attempt"] == last_attempt)
        .filter_map(|e| e["progress"]["step"].as_u64())
        .min();
    assert!(
        last_attempt == 0 || resumed_at.is_some_and(|s| s > 2),
        "attempt {last_attempt} started at step {resumed_at:?}"
    );
    let last = events(&out.stdout)
        .into_iter()
        .rev()
        .find(|e| e["event"] == "state")
        .expect("the watch saw the job's states");
    assert_eq!(last["job"]["state"], "succeeded");
    let fetched = cluster.path("fetched");
    cluster
        .json(&["fetch", &one, "--out", fetched.to_str().unwrap()])
        .unwrap();
    assert_kohya_lora(&fetched.join("first.safetensors"));

    // The logs outlive the coordinator: after one more restart, with every job ended, the
    // lines written before the first kill are still there.
    cluster.kill_coordinator();
    cluster.start_coordinator().unwrap();
    let after = cluster.run(&["logs", &one]);
    assert!(after.ok(), "{after:?}");
    for line in before.stdout.lines() {
        assert!(
            after.stdout.contains(line),
            "`{line}` lost:\n{}",
            after.stdout
        );
    }
}

#[test]
fn refused_requests_change_nothing() {
    let mut cluster = Cluster::start(Some(TOKEN)).unwrap();
    let allowed = cluster.path("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let mut setup = WorkerSetup::cpu("guard");
    setup.data_dirs = vec![allowed];
    cluster.add_worker(setup).unwrap();
    let job = tiny_job(&cluster.path("job"), "guarded", 2, "").unwrap();
    let job_arg = job.to_str().unwrap();

    // Wrong or missing token: refused before anything is stored.
    let wrong = cluster.run(&["--token", "guess", "submit", job_arg]);
    assert_eq!(wrong.code, Some(1));
    assert!(
        wrong.stderr.contains("wrong token") && wrong.stderr.contains("--token"),
        "{}",
        wrong.stderr
    );
    let mut anonymous = cluster.loractl();
    let anonymous = anonymous
        .env_remove("LORACTL_TOKEN")
        .args(["list"])
        .output()
        .unwrap();
    assert_eq!(anonymous.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&anonymous.stderr).contains("authorization"));

    // A malformed spec: the key at fault, with a suggestion.
    let typo = cluster.path("typo.toml");
    std::fs::write(
        &typo,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("max_train_steps", "max_train_step"),
    )
    .unwrap();
    let out = cluster.run(&["submit", typo.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("training.max_train_step") && out.stderr.contains("max_train_steps"),
        "{}",
        out.stderr
    );

    // A dataset folder that is not there.
    let missing = cluster.path("missing.toml");
    std::fs::write(
        &missing,
        std::fs::read_to_string(&job).unwrap().replace(
            &cluster.path("job/train").display().to_string(),
            &cluster.path("nowhere").display().to_string(),
        ),
    )
    .unwrap();
    let out = cluster.run(&["submit", missing.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("dataset.train_data_dir") && out.stderr.contains("nowhere"),
        "{}",
        out.stderr
    );

    // None of that reached the coordinator.
    assert_eq!(cluster.json(&["list"]).unwrap(), serde_json::json!([]));
    assert_eq!(cluster.stored_blobs(), 0);

    // A worker-side path outside the worker's data_dirs: refused by the worker as a bad config
    // (not retried), before any rank runs.
    let out = cluster.run(&["submit", job_arg, "--remote-data"]);
    let escaped = submitted_id(&out);
    let failed = cluster.wait_job(&escaped, "failed", |j| state(j) == "failed");
    assert_eq!(failed["last_failure"]["kind"], "bad config", "{failed}");
    let message = failed["last_failure"]["message"].as_str().unwrap();
    assert!(
        message.contains("dataset.train_data_dir") && message.contains("data_dirs"),
        "{message}"
    );
    assert_eq!(failed["attempt"], 0);
    // The same through the API with a relative `..` path, bypassing the CLI.
    let raw = std::fs::read_to_string(&job).unwrap().replace(
        &cluster.path("job/train").display().to_string(),
        "../../../../../job/train",
    );
    let link = loractl_worker::client::Link::new(&cluster.address(), Some(TOKEN), None).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let raw_id = runtime.block_on(async {
        let mut jobs = link.jobs().await.unwrap();
        let reply = jobs
            .submit_job(pb::SubmitJobRequest {
                spec_toml: raw,
                priority: 0,
            })
            .await
            .unwrap()
            .into_inner();
        reply.job.unwrap().id
    });
    let failed = cluster.wait_job(&raw_id, "failed", |j| state(j) == "failed");
    assert_eq!(failed["last_failure"]["kind"], "bad config", "{failed}");
    assert!(failed["last_failure"]["message"]
        .as_str()
        .unwrap()
        .contains("../../../../../job/train"));
    for id in [&escaped, &raw_id] {
        let logs = cluster.run(&["logs", id]);
        assert!(logs.stdout.trim().is_empty(), "a rank ran: {}", logs.stdout);
    }

    // Unknown jobs and impossible transitions are sentences naming the job.
    let out = cluster.run(&["status", "j999"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("job `j999` does not exist"),
        "{}",
        out.stderr
    );
    let out = cluster.run(&["cancel", &escaped]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("cannot go from failed"),
        "{}",
        out.stderr
    );
}

#[test]
fn loractl_up_runs_a_coordinator_and_a_worker_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let port = loractl_tests::free_port();
    let metrics_port = loractl_tests::free_port();
    let address = format!("http://127.0.0.1:{port}");
    let mut up = std::process::Command::new(loractl_tests::bin("loractl"));
    up.args(["up", "--gpus", "cpu", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg("--dir")
        .arg(dir.path().join("cluster"))
        .env_remove("LORACTL_TOKEN");
    let mut up = loractl_tests::Proc::spawn("loractl up", up, dir.path().join("up.log")).unwrap();
    let loractl = |args: &[&str]| {
        let out = std::process::Command::new(loractl_tests::bin("loractl"))
            .args(args)
            .env("LORACTL_COORDINATOR", &address)
            .env_remove("LORACTL_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    loractl_tests::poll(
        "loractl up to list its worker",
        loractl_tests::DEADLINE,
        || {
            let (code, stdout, _) = loractl(&["workers", "--json"]);
            let workers: Value = serde_json::from_str(&stdout).ok()?;
            (code == Some(0) && workers[0]["name"] == "local" && workers[0]["alive"] == true)
                .then_some(())
        },
    );
    let job = tiny_job(&dir.path().join("job"), "allinone", 2, "").unwrap();
    let (code, stdout, stderr) = loractl(&["submit", job.to_str().unwrap(), "--watch"]);
    assert_eq!(code, Some(0), "{stderr}\n{}", up.log_tail());
    let id = stdout.lines().next().unwrap_or_default().to_owned();
    let out = dir.path().join("fetched");
    let (code, _, stderr) = loractl(&["fetch", &id, "--out", out.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_kohya_lora(&out.join("allinone.safetensors"));
    // One endpoint carries the coordinator's metrics and the worker's, its rank's training
    // progress included.
    let metrics = loractl_tests::cluster::scrape(metrics_port);
    for want in [
        "loractl_workers{state=\"ready\"} 1".to_owned(),
        "loractl_jobs_finished_total{state=\"succeeded\"} 1".to_owned(),
        format!("job_id=\"{id}\""),
    ] {
        assert!(metrics.contains(&want), "no `{want}` in:\n{metrics}");
    }
    let step = metrics
        .lines()
        .find(|l| l.starts_with("loractl_train_step{") && l.contains(&format!("job_id=\"{id}\"")))
        .unwrap_or_else(|| panic!("no training step of {id} in:\n{metrics}"));
    assert!(step.ends_with(" 2"), "{step}");

    up.terminate();
    let status = loractl_tests::poll("loractl up to stop", loractl_tests::DEADLINE, || {
        up.exited()
    });
    assert!(status.success(), "{status}\n{}", up.log_tail());
}

#[test]
fn on_etcd_the_leader_killed_mid_run_hands_over_to_the_standby_and_the_job_succeeds() {
    let Some(etcd) = Etcd::start() else {
        return;
    };
    let mut cluster = Cluster::start_on(Some(TOKEN), Store::Etcd(etcd.endpoint.clone())).unwrap();
    // The standby campaigns for the same address; it serves once it leads.
    cluster.start_coordinator().unwrap();
    cluster.add_worker(WorkerSetup::cpu("etcd-worker")).unwrap();
    let job = tiny_job(&cluster.path("job"), "ha", 8, "").unwrap();
    let id = submitted_id(&cluster.run(&["submit", job.to_str().unwrap()]));
    let mut watch = cluster.loractl();
    watch.args(["watch", &id, "--json"]);
    let watch = Background::spawn(watch);
    cluster.wait_job(&id, "a checkpoint stored", |j| {
        state(j) == "running" && !j["latest_checkpoint"].is_null()
    });

    cluster.kill_coordinator();
    let done = cluster.wait_job(&id, "the end under the new leader", |j| {
        matches!(state(j), "succeeded" | "failed" | "cancelled")
    });
    assert_eq!(
        state(&done),
        "succeeded",
        "{done}\n{}\n{}",
        cluster.logs(),
        etcd.log_tail()
    );
    let standby_log = std::fs::read_to_string(cluster.path("coordinator-1.log")).unwrap();
    assert!(standby_log.contains("elected leader"), "{standby_log}");
    let out = watch.finish();
    assert_eq!(out.code, Some(0), "{}\n{}", out.stderr, out.stdout);
    let fetched = cluster.path("fetched");
    cluster
        .json(&["fetch", &id, "--out", fetched.to_str().unwrap()])
        .unwrap();
    assert_kohya_lora(&fetched.join("ha.safetensors"));
    assert_eq!(
        cluster.json(&["list"]).unwrap().as_array().map(Vec::len),
        Some(1)
    );
}

#[test]
fn the_cli_reaches_a_tls_coordinator_through_its_ca() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let certs = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "loractl e2e CA");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let write = |name: &str, text: &str| {
        let path = certs.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (ca_file, cert, key) = (
        write("ca.pem", &ca_pem),
        write("server.pem", &leaf.pem()),
        write("server.key", &key.serialize_pem()),
    );
    let cluster = Cluster::start_with(
        Some(TOKEN),
        Store::Redb,
        &["--tls-cert", &cert, "--tls-key", &key],
    )
    .unwrap();
    let https = format!("https://127.0.0.1:{}", cluster.port);
    let trusted = cluster.run(&[
        "--coordinator",
        &https,
        "--ca",
        &ca_file,
        "--tls-domain",
        "localhost",
        "list",
        "--json",
    ]);
    assert!(trusted.ok(), "{}", trusted.stderr);
    assert_eq!(trusted.stdout.trim(), "[]");
    let no_ca = cluster.run(&["--coordinator", &https, "list"]);
    assert_eq!(no_ca.code, Some(1));
    assert!(no_ca.stderr.contains("--ca"), "{}", no_ca.stderr);
    let plain = cluster.run(&["list"]);
    assert_eq!(plain.code, Some(1));
    assert!(plain.stderr.contains("https://"), "{}", plain.stderr);
}
