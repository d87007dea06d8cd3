// Validate custom resources read from stdin (a multi-document YAML render) against schemas generated
// from their CRDs. Prints one JSON line per custom resource; exits 1 if any fails or is unknown.
import { readFileSync } from "node:fs";
import yaml from "js-yaml";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";

const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
};
let failed = false;
for (const doc of yaml.loadAll(readFileSync(0, "utf8"))) {
  if (!doc || !doc.apiVersion) continue;
  const key = `${doc.apiVersion}/${doc.kind}`;
  const builtin = !doc.apiVersion.includes(".") || doc.apiVersion.includes("k8s.io/");
  if (builtin) continue;
  const Model = MODELS[key];
  let result = { kind: doc.kind, name: doc.metadata?.name, passed: true };
  if (!Model) {
    result = { ...result, passed: false, error: `no CRD schema known for ${key}` };
  } else {
    try {
      new Model(doc).validate();
    } catch (err) {
      result = { ...result, passed: false, error: String(err.message || err) };
    }
  }
  failed ||= !result.passed;
  console.log(JSON.stringify(result));
}
process.exit(failed ? 1 : 0);
