// A Node client of proto/api.proto (@grpc/grpc-js with @grpc/proto-loader, from npm), dialing
// berthd as grpc-js documents it, with no channel options: State and two error codes, then an
// Events stream that sees a container it creates start and exit.
//
// Usage: node client.js NODE_MODULES PROTO_DIR SOCKET BUNDLE ID

const [modules, protoDir, socket, bundle, id] = process.argv.slice(2);
const grpc = require(`${modules}/@grpc/grpc-js`);
const loader = require(`${modules}/@grpc/proto-loader`);

const definition = loader.loadSync(`${protoDir}/api.proto`, { includeDirs: [protoDir], defaults: true });
const { API } = grpc.loadPackageDefinition(definition).types;
const api = new API(`unix://${socket}`, grpc.credentials.createInsecure());

const call = (method, request) =>
  new Promise((resolve, reject) =>
    api[method](request, (err, response) => (err ? reject(err) : resolve(response))),
  );

async function expectCode(code, pending) {
  try {
    await pending;
  } catch (err) {
    if (err.code !== code) throw new Error(`expected code ${code}, got ${err.code}: ${err.details}`);
    return;
  }
  throw new Error(`expected code ${code}, the call succeeded`);
}

async function main() {
  const state = await call("State", {});
  if (!(state.machine.cpus > 0)) throw new Error(`State: ${JSON.stringify(state)}`);
  // Errors carry their own codes, those of the answers berthd paces (ListCheckpoint) as well.
  await expectCode(grpc.status.NOT_FOUND, call("ListCheckpoint", { id: `${id}-none` }));

  const events = api.Events({});
  const seen = [];
  let exited;
  const done = new Promise((resolve) => (exited = resolve));
  events.on("data", (e) => {
    if (e.id !== id) return;
    seen.push([e.type, e.pid, e.status]);
    if (e.type === "exit") exited();
  });
  events.on("error", (err) => {
    if (err.code !== grpc.status.CANCELLED) throw err;
  });
  // Response headers arrive once berthd has subscribed the stream.
  await new Promise((resolve) => events.on("metadata", resolve));

  const { pid } = await call("CreateContainer", { id, bundlePath: bundle });
  await expectCode(grpc.status.INVALID_ARGUMENT, call("Signal", { id, pid, signal: 65 }));
  await call("Signal", { id, pid, signal: 9 });
  const timer = setTimeout(() => {
    throw new Error(`no exit event: ${JSON.stringify(seen)}`);
  }, 20000);
  await done;
  clearTimeout(timer);
  events.cancel();
  const expected = JSON.stringify([["start-container", pid, 0], ["exit", pid, 137]]);
  if (JSON.stringify(seen) !== expected) throw new Error(`events: ${JSON.stringify(seen)}`);
  console.log(`interop ok: grpc-js ${require(`${modules}/@grpc/grpc-js/package.json`).version}`);
  api.close();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
