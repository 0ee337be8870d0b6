//! Bulwark's control plane. `index` keeps the resources and the sidecar pods in memory and
//! turns them into one config per group of pods; `status` derives what each resource reports.
//! Neither talks to the Kubernetes API: the controllers feed them and write what they return.

pub mod index;
pub mod status;
