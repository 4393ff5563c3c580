'use strict';
// A small Node.js client for the bios render and train gRPC services (contract: protos/bios/v1/*.proto).
//
// Loading options (see loadSync below) shape every message object:
//   keepCase  field names exactly as in the .proto (token_ids, loss_fn_inputs, ...)
//   longs     int64 fields (seq, step, shape, ...) decode as decimal *strings*, so no value is ever rounded;
//             use int64() to turn one into a Number (or a BigInt past 2^53). Numbers are fine when sending.
//   enums     enum values as their names ('DTYPE_INT64'), accepted the same way when sending
//   defaults  unset scalar fields decode as their zero value instead of being absent
//   oneofs    each oneof also gets a field naming the member that is set, e.g. event.event === 'error'

const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '../../protos');
const definition = protoLoader.loadSync(['bios/v1/render.proto', 'bios/v1/train.proto'], {
  includeDirs: [PROTO_ROOT], // google/protobuf/struct.proto comes bundled with protobufjs
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const pb = grpc.loadPackageDefinition(definition).bios.v1;

// ---- values --------------------------------------------------------------------------------------

/** An int64 as decoded (a string) -> Number when exactly representable, else BigInt. */
function int64(value) {
  const big = BigInt(value);
  return big >= BigInt(Number.MIN_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
}

const DTYPES = {
  int64: ['DTYPE_INT64', BigInt64Array],
  int32: ['DTYPE_INT32', Int32Array],
  float32: ['DTYPE_FLOAT32', Float32Array],
  float64: ['DTYPE_FLOAT64', Float64Array],
};
const DTYPE_NAMES = Object.fromEntries(Object.entries(DTYPES).map(([name, [wire]]) => [wire, name]));

// Tensor data is little-endian on the wire; TypedArrays use the host's order, so swap on big-endian hosts.
function toLittleEndian(buffer, itemSize) {
  if (os.endianness() === 'BE') buffer[`swap${itemSize * 8}`]();
  return buffer;
}

/** A 1-D Tensor message from numbers: tensor([1, 2], 'int64'). */
function tensor(values, dtype = 'float32') {
  const [wire, Typed] = DTYPES[dtype] ?? [];
  if (!Typed) throw new TypeError(`tensor: unsupported dtype ${dtype}`);
  const array = Typed === BigInt64Array ? BigInt64Array.from(values, (v) => BigInt(v)) : Typed.from(values);
  const data = toLittleEndian(Buffer.from(array.buffer, array.byteOffset, array.byteLength), array.BYTES_PER_ELEMENT);
  return { dtype: wire, shape: [array.length], data };
}

/** A decoded Tensor message -> flat Array of Numbers (row-major; int64 entries via int64()). */
function fromTensor(t) {
  const Typed = DTYPES[DTYPE_NAMES[t.dtype]]?.[1];
  if (!Typed) throw new TypeError(`tensor: unsupported dtype ${t.dtype}`);
  // Copy first: the decoded Buffer may sit at an offset that is not a multiple of the element size.
  const bytes = toLittleEndian(Buffer.from(t.data), Typed.BYTES_PER_ELEMENT);
  const array = new Typed(bytes.buffer, bytes.byteOffset, bytes.length / Typed.BYTES_PER_ELEMENT);
  return Array.from(array, (v) => (typeof v === 'bigint' ? int64(v) : v));
}

/** A plain JS object -> google.protobuf.Struct (for RendererSpec.options such as enable_thinking). */
function toStruct(object) {
  const value = (v) => {
    if (v === null || v === undefined) return { null_value: 'NULL_VALUE' };
    if (typeof v === 'boolean') return { bool_value: v };
    if (typeof v === 'number') return { number_value: v };
    if (typeof v === 'string') return { string_value: v };
    if (Array.isArray(v)) return { list_value: { values: v.map(value) } };
    return { struct_value: toStruct(v) };
  };
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, value(v)])) };
}

/** An Error shaped like grpc-js's ServiceError ({code, details}) for a status carried in an OperationEvent. */
function statusError(code, details) {
  const name = Object.keys(grpc.status).find((key) => grpc.status[key] === code) ?? 'UNKNOWN';
  return Object.assign(new Error(`${code} ${name}: ${details}`), { code, details });
}

// ---- clients -------------------------------------------------------------------------------------

const credentials = (options) => options.credentials ?? grpc.credentials.createInsecure();
/** One value per attribution run of a RenderedTokens (run_lengths[k] tokens each) -> one per token. */
function perToken(rendered, values) {
  const lengths = rendered.run_lengths;
  if (lengths.length !== values.length) throw new Error(`run_weights: ${values.length} values for ${lengths.length} runs`);
  return lengths.flatMap((n, k) => Array(n).fill(values[k]));
}

const renderClient = (address, options = {}) => new pb.RenderService(address, credentials(options));
const trainClient = (address, options = {}) => new pb.TrainService(address, credentials(options));

/** The train pod that issued an id or holds a bios:// checkpoint path (session-p3-… -> 3), or null: see
 * clients/python/bios/placement.py and docs/deployment.md. */
function podOf(idOrPath) {
  const found = /(?:^|\/)(?:session|model|sampler)-p(\d+)-[0-9a-f]+/.exec(idOrPath ?? '');
  return found ? Number(found[1]) : null;
}

/** Both services behind one object with Promise-returning helpers. */
class BiosClient {
  /**
   * @param {{render?: string, train?: string, trainPod?: string, apiKey?: string,
   *          credentials?: grpc.ChannelCredentials}} options
   * `train` is the placement address (any train pod); `trainPod` (default $BIOS_TRAIN_POD_ADDRESS) names one pod
   * by `{pod}`, e.g. 'bios-train-{pod}.bios-train-headless.bios.svc:50052': a call that carries a session, model
   * or checkpoint id goes to the pod the id names.
   */
  constructor({ render, train, trainPod = process.env.BIOS_TRAIN_POD_ADDRESS, apiKey = process.env.BIOS_API_KEY,
    ...options } = {}) {
    if (trainPod && !trainPod.includes('{pod}')) throw new Error(`trainPod: ${trainPod} has no {pod} placeholder`);
    this.renderStub = render ? renderClient(render, options) : null;
    this.trainStub = train ? trainClient(train, options) : null;
    this.trainPod = trainPod;
    this.podStubs = new Map(); // pod ordinal -> TrainService client, opened on first use
    this.options = options;
    this.metadata = new grpc.Metadata();
    if (apiKey) this.metadata.set('authorization', `Bearer ${apiKey}`);
  }

  /** The train stub for calls about this id: its pod's, or the placement address's. */
  trainFor(id) {
    const pod = podOf(id);
    if (!this.trainPod || pod === null) return this.trainStub;
    if (!this.podStubs.has(pod)) this.podStubs.set(pod, trainClient(this.trainPod.replace('{pod}', pod), this.options));
    return this.podStubs.get(pod);
  }

  /** One unary call as a Promise; rejects with the grpc-js error ({code, details}). */
  call(client, method, request) {
    if (!client) throw new Error(`${method}: no address was given for this service`);
    return new Promise((resolve, reject) =>
      client[method](request, this.metadata, (err, response) => (err ? reject(err) : resolve(response))));
  }

  /** BuildSupervisedExample: spec = {name, tokenizer, options?}; messages = [{role, content}, ...]. */
  async render(spec, messages, { trainOnWhat, tools } = {}) {
    const renderer = { name: spec.name ?? '', tokenizer: spec.tokenizer ?? '' };
    if (spec.options) renderer.options = toStruct(spec.options);
    const example = await this.call(this.renderStub, 'BuildSupervisedExample', {
      renderer, conversation: { messages, tools: tools ?? [] }, train_on_what: trainOnWhat ?? 'TRAIN_ON_WHAT_UNSPECIFIED',
    });
    return { tokens: example.tokens.token_ids, weights: perToken(example.tokens, example.run_weights), rendered: example.tokens };
  }

  async createSession(tags = {}) {
    const response = await this.call(this.trainStub, 'CreateSession', { tags, client_version: 'bios-node/0.1' });
    return response.session_id;
  }

  closeSession(sessionId) {
    return this.call(this.trainFor(sessionId), 'CloseSession', { session_id: sessionId });
  }

  /** CreateModel -> ModelInfo; lora = {rank, alpha?, seed?, train_attn, train_mlp, train_unembed}. */
  createModel(sessionId, baseModel, lora = {}) {
    return this.call(this.trainFor(sessionId), 'CreateModel', { session_id: sessionId, base_model: baseModel, lora });
  }

  /** The ordered operation stream of one model. */
  operate(modelId) {
    return new OperationStream(this.trainFor(modelId), modelId, this.metadata);
  }

  close() {
    this.renderStub?.close();
    this.trainStub?.close();
    for (const stub of this.podStubs.values()) stub.close();
  }
}

// ---- the operation stream ------------------------------------------------------------------------

/**
 * A wrapper over the bidirectional Operate stream. Every operation gets the next sequence number and is
 * written at once (pipelined); its Promise settles when the event with that number arrives. An `error`
 * event rejects only that operation: the stream stays open for the others.
 */
class OperationStream {
  constructor(client, modelId, metadata = new grpc.Metadata()) {
    this.modelId = modelId;
    this.nextSeq = 0;
    this.pending = new Map(); // String(seq) -> {resolve, reject}; decoded seqs are strings (longs: String)
    this.call = client.Operate(metadata);
    this.closed = new Promise((resolve) => this.call.on('status', resolve));
    this.call.on('data', (event) => this.onEvent(event));
    // A stream-level failure (the RPC ended with a non-OK status) fails everything still unanswered.
    this.call.on('error', (err) => this.failAll(err));
    this.call.on('end', () => this.failAll(statusError(grpc.status.UNAVAILABLE, 'operation stream ended early')));
  }

  /** Send one operation, e.g. submit({optim_step: {...}}); resolves to its OperationEvent. */
  submit(op) {
    const seq = this.nextSeq++;
    const request = { seq, ...op };
    if (seq === 0) request.model_id = this.modelId; // the first request names the model
    return new Promise((resolve, reject) => {
      this.pending.set(String(seq), { resolve, reject });
      this.call.write(request);
    });
  }

  onEvent(event) {
    if (event.event === 'progress') return;
    const entry = this.pending.get(event.seq);
    if (!entry) return;
    this.pending.delete(event.seq);
    if (event.event === 'error') entry.reject(statusError(event.error.code, event.error.message));
    else entry.resolve(event);
  }

  failAll(err) {
    for (const { reject } of this.pending.values()) reject(err);
    this.pending.clear();
  }

  /** -> ForwardBackwardOutput {loss_fn_outputs: [{tensors}], metrics: {'loss:sum': ...}} */
  async forwardBackward(data, lossFn = 'cross_entropy', lossFnConfig = {}) {
    const event = await this.submit({ forward_backward: { data, loss_fn: lossFn, loss_fn_config: lossFnConfig } });
    return event.forward_backward;
  }

  async forward(data, lossFn = 'cross_entropy', lossFnConfig = {}) {
    const event = await this.submit({ forward: { data, loss_fn: lossFn, loss_fn_config: lossFnConfig } });
    return event.forward_backward;
  }

  /** -> {metrics, step} with step as a Number. */
  async optimStep(adamParams) {
    const { optim_step: result } = await this.submit({ optim_step: { adam_params: adamParams } });
    return { metrics: result.metrics, step: int64(result.step) };
  }

  async saveState(name, metadataJson = '') {
    return (await this.submit({ save_state: { name, metadata_json: metadataJson } })).checkpoint;
  }

  async saveWeightsForSampler(name) {
    return (await this.submit({ save_weights_for_sampler: { name } })).checkpoint;
  }

  /** Half-close: the server answers whatever is still pending, then ends the stream. Resolves with its status. */
  close() {
    this.call.end();
    return this.closed;
  }
}

module.exports = { BiosClient, OperationStream, renderClient, trainClient, tensor, fromTensor, toStruct, perToken, int64, podOf, pb, grpc };
