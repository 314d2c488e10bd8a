// A client of the dptrain coordinator as a Node.js user writes one: stubs loaded at run time
// from the .proto files dptrain installs (`dptrain proto-path`), a job file sent as it is
// (SubmitJobRequest.spec_text), and server reflection asked in both of its versions with the
// reflection protos grpc-js's own @grpc/reflection ships. Prints one JSON object.
//
//   NODE_PATH=DIR/node_modules node client.cjs ADDRESS TOKEN_FILE PROTO_PATH JOB_FILE
"use strict";
const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [address, tokenFile, protoPath, jobFile] = process.argv.slice(2);
// Whitespace stripped: grpc-js refuses a header value that ends in a newline.
const token = fs.readFileSync(tokenFile, "utf8").trim();
const metadata = () => {
  const m = new grpc.Metadata();
  m.add("authorization", `Bearer ${token}`);
  return m;
};
const options = { keepCase: true, longs: String, enums: String, defaults: false, oneofs: true };
const credentials = grpc.credentials.createInsecure();

function load(file, includeDir) {
  return grpc.loadPackageDefinition(loader.loadSync(file, { ...options, includeDirs: [includeDir] }));
}

function listServices(version) {
  const protos = path.join(process.env.NODE_PATH, "@grpc", "reflection", "build", "proto");
  const api = load(`grpc/reflection/${version}/reflection.proto`, protos);
  const client = new api.grpc.reflection[version].ServerReflection(address, credentials);
  return new Promise((resolve, reject) => {
    const call = client.ServerReflectionInfo(metadata());
    call.on("data", (response) => {
      resolve(response.list_services_response.service.map((s) => s.name).sort());
      call.end();
    });
    call.on("error", reject);
    call.write({ list_services: "" });
  });
}

function unary(client, method, request) {
  return new Promise((resolve) => {
    client[method](request, metadata(), (error, reply) => {
      resolve(error ? { code: grpc.status[error.code], details: error.details } : reply);
    });
  });
}

async function main() {
  const api = load("dptrain/v1/coordinator.proto", protoPath);
  const coordinator = new api.dptrain.v1.Coordinator(address, credentials);
  const text = fs.readFileSync(jobFile, "utf8");
  const submitted = await unary(coordinator, "SubmitJob", { spec_text: text, priority: 2 });
  const job = submitted.id ? await unary(coordinator, "GetJob", { job_id: submitted.id }) : submitted;
  const refused = await unary(coordinator, "SubmitJob", {
    spec_text: text.replace(/lr: [^,}\n]+/, "lr: -0.1"),
  });
  const out = {
    v1: await listServices("v1"),
    v1alpha: await listServices("v1alpha"),
    job: { id: job.id, name: job.name, state: job.state, priority: job.priority, spec: job.spec },
    refused,
  };
  process.stdout.write(JSON.stringify(out) + "\n");
  coordinator.close();
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
