'use strict';
// The README's quick-start example from Node.js: upload a torch.package, load its model, call it
// with a float32 tensor, then show what a failed call carries. When the daemon's workers serve
// calls themselves (pool.data_ports), it also calls them there, round robin, not through the daemon.
//
//   node examples/node/index.js [ADDRESS] [PACKAGE]
//
// Prints one JSON object per line on stdout: {"result": ...}, then {"error": ...}, then, with
// data ports, {"direct": ...}.

const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { once } = require('node:events');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
// protobufjs ships with proto-loader; resolving it from there uses that very copy, so the example
// needs no dependency of its own to decode the error detail.
const protobuf = require(require.resolve('protobufjs', {
  paths: [path.dirname(require.resolve('@grpc/proto-loader'))],
}));

const ADDRESS = process.argv[2] || process.env.DEPLOYD_ADDRESS || '127.0.0.1:50051';
const PACKAGE = process.argv[3] || 'my_package.pt';
const TOKEN = process.env.DEPLOYD_TOKEN || '';
const PROTOS = path.join(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'deployd/v1/deployd.proto';
const CHUNK_BYTES = 1024 * 1024;
const TIMEOUT_MS = 60_000;
const ERROR_DETAIL_KEY = 'deployd-error-detail-bin';
const DIRECT_CALLS = 10;
const CHANNEL_OPTIONS = { 'grpc.max_receive_message_length': 256 * 1024 * 1024 }; // grpc-js's default is 4 MiB

const definition = protoLoader.loadSync(PROTO_FILE, {
  includeDirs: [PROTOS],
  keepCase: true, // field names as in the .proto (object_id), the same as every other client
  longs: String, // int64 without losing precision; a shape is converted with Number()
  enums: String, // dtype reads 'DTYPE_FLOAT32', not 2
  defaults: true, // an empty shape (a scalar) arrives as [], not undefined
  oneofs: true, // a Value says which of its kinds is set: value.kind === 'tensor_value'
});
const { Deployd } = grpc.loadPackageDefinition(definition).deployd.v1;
const ErrorDetail = new protobuf.Root()
  .loadSync(path.join(PROTOS, PROTO_FILE), { keepCase: true })
  .lookupType('deployd.v1.ErrorDetail');

// The wire's tensors are little-endian; typed arrays use the machine's order.
if (os.endianness() !== 'LE') throw new Error('this example assumes a little-endian machine');

const TYPED_ARRAYS = {
  DTYPE_FLOAT32: Float32Array,
  DTYPE_FLOAT64: Float64Array,
  DTYPE_INT8: Int8Array,
  DTYPE_INT16: Int16Array,
  DTYPE_INT32: Int32Array,
  DTYPE_INT64: BigInt64Array,
  DTYPE_UINT8: Uint8Array,
  DTYPE_BOOL: Uint8Array,
};

function toTensor(shape, values) {
  const dtype = Object.keys(TYPED_ARRAYS).find((name) => values instanceof TYPED_ARRAYS[name]);
  return { dtype, shape, data: Buffer.from(values.buffer, values.byteOffset, values.byteLength) };
}

function fromTensor({ dtype, shape, data }) {
  const TypedArray = TYPED_ARRAYS[dtype];
  if (!TypedArray) throw new Error(`no typed array for ${dtype} in this example`);
  const dims = shape.map(Number);
  const count = dims.reduce((a, b) => a * b, 1);
  if (data.length !== count * TypedArray.BYTES_PER_ELEMENT) {
    throw new Error(`${dtype} of shape [${dims}] needs ${count * TypedArray.BYTES_PER_ELEMENT} bytes, got ${data.length}`);
  }
  // Copied: a received Buffer may start at an offset a Float32Array cannot view.
  return { dtype, shape: dims, values: new TypedArray(new Uint8Array(data).buffer) };
}

// The daemon's auth reads a bearer token from call metadata, over plaintext as over TLS.
function metadata() {
  const result = new grpc.Metadata();
  if (TOKEN) result.set('authorization', `Bearer ${TOKEN}`);
  return result;
}

function options() {
  return { deadline: Date.now() + TIMEOUT_MS };
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata(), options(), (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// The same, with the address of the server that answered (grpc-js's call.getPeer()).
function unaryWithPeer(client, method, request) {
  return new Promise((resolve, reject) => {
    const call = client[method](request, metadata(), options(), (error, response) =>
      error ? reject(error) : resolve({ response, peer: call.getPeer() }),
    );
  });
}

// One target for every worker's data port: grpc-js's ipv4: (or ipv6:) scheme lists several
// addresses, and round_robin spreads the calls over them. Host names have no such scheme.
function workersTarget(addresses) {
  const hosts = addresses.map((address) => address.slice(0, address.lastIndexOf(':')));
  if (hosts.every((host) => net.isIPv4(host))) return `ipv4:${addresses.join(',')}`;
  if (hosts.every((host) => host.startsWith('[') && net.isIPv6(host.slice(1, -1)))) {
    return `ipv6:${addresses.join(',')}`;
  }
  return null;
}

// The direct path: with pool.data_ports, every worker serves Invoke and HasAttr (and KServe
// v2's ModelInfer) on a port of its own, with the daemon's tokens. Endpoints says where (the
// host is server.advertise_host); a channel over all of them then skips the daemon altogether.
async function callWorkers(client, request, byDaemon) {
  const { workers } = await unary(client, 'Endpoints', {});
  if (workers.length === 0) return null; // no data ports (pool.data_ports -1): the daemon path only
  const addresses = workers.map((worker) => worker.address);
  const target = workersTarget(addresses);
  if (!target) return { skipped: `not IP addresses, set server.advertise_host to one: ${addresses}` };
  const direct = new Deployd(target, grpc.credentials.createInsecure(), {
    ...CHANNEL_OPTIONS,
    'grpc.service_config': JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] }),
  });
  try {
    const peers = {};
    let sameAsDaemon = true;
    for (let i = 0; i < DIRECT_CALLS; i++) {
      const { response, peer } = await unaryWithPeer(direct, 'Invoke', request);
      peers[peer] = (peers[peer] || 0) + 1;
      sameAsDaemon &&= response.result.kind === 'tensor_value' && response.result.tensor_value.data.equals(byDaemon);
    }
    return { target, calls: DIRECT_CALLS, peers, same_as_daemon: sameAsDaemon };
  } finally {
    direct.close();
  }
}

// Streams the local file in chunks, as the Python client's load_package(path) does: the daemon
// need not see the caller's disk (server_path would name a file in its package directory).
async function loadPackage(client, file) {
  let call;
  const done = new Promise((resolve, reject) => {
    call = client.LoadPackage(metadata(), options(), (error, response) => (error ? reject(error) : resolve(response)));
  });
  // A local read error must fail the call, not leave it open until its deadline.
  const source = fs.createReadStream(file, { highWaterMark: CHUNK_BYTES });
  try {
    for await (const chunk of source) {
      if (!call.write({ chunk })) await once(call, 'drain');
    }
  } catch (error) {
    call.cancel();
    done.catch(() => {});
    throw error;
  }
  call.end();
  return done;
}

// grpc-js's errors: a numeric status code, the daemon's message, and the trailing metadata.
function isRpcError(error) {
  return typeof error.code === 'number' && error.metadata instanceof grpc.Metadata;
}

function describeError(error) {
  const [raw] = error.metadata ? error.metadata.get(ERROR_DETAIL_KEY) : [];
  // Only some failures carry a detail: model code that raised, or a call that killed its worker.
  const detail = raw ? ErrorDetail.toObject(ErrorDetail.decode(raw), { defaults: true }) : {};
  return {
    code: error.code,
    code_name: grpc.status[error.code],
    details: error.details,
    remote_type: detail.remote_type || '',
    call_killed_worker: Boolean(detail.call_killed_worker),
    remote_traceback: detail.remote_traceback || '',
    // The id the daemon logs the model's whole traceback under (the answer's is cut to fit).
    call_id: String((error.metadata && error.metadata.get('x-request-id')[0]) || ''),
  };
}

async function main() {
  const client = new Deployd(ADDRESS, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  // Remembered so that unloading leaves a package another caller had loaded (same bytes, same id).
  const before = new Set((await unary(client, 'Status', {})).packages.map((entry) => entry.package_id));
  const { package_id } = await loadPackage(client, PACKAGE);
  let object_id;
  try {
    ({ object_id } = await unary(client, 'LoadPickle', { package_id, module: 'model', file: 'model.pkl' }));

    const ones = new Float32Array(1 * 1 * 10 * 10).fill(1);
    const request = { object_id, args: [{ tensor_value: toTensor([1, 1, 10, 10], ones) }] };
    const { result } = await unary(client, 'Invoke', request);
    if (result.kind !== 'tensor_value') throw new Error(`expected a tensor, got ${result.kind}`);
    const tensor = fromTensor(result.tensor_value);
    console.log(JSON.stringify({ result: { ...tensor, values: Array.from(tensor.values) } }));

    // Two channels where the model's first convolution takes one: its code raises in the worker.
    const wrong = { object_id, args: [{ tensor_value: toTensor([1, 2, 10, 10], new Float32Array(200)) }] };
    try {
      await unary(client, 'Invoke', wrong);
      throw new Error('the call with a wrong input succeeded');
    } catch (error) {
      if (!isRpcError(error)) throw error;
      console.log(JSON.stringify({ error: describeError(error) }));
    }

    const direct = await callWorkers(client, request, result.tensor_value.data);
    if (direct) console.log(JSON.stringify({ direct }));
  } finally {
    if (object_id) await unary(client, 'UnloadObject', { object_id });
    if (!before.has(package_id)) await unary(client, 'UnloadPackage', { package_id });
    client.close();
  }
}

main().catch((error) => {
  console.error(isRpcError(error) ? `${grpc.status[error.code]}: ${error.details}` : error);
  process.exit(1);
});
