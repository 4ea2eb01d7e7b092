// An agent's MCP client, the TypeScript SDK (@modelcontextprotocol/sdk) over streamable HTTP,
// driven step by step by tests/test_mcp_clients.py: the same protocol as ../python_client.py.
//
//     node client.mjs URL TASK_ID PLAN_JSON      (TASK_ID "": no X-Agent-Task header)
//
// One JSON line per step on stdout: what the SDK's user sees (the tools listed; the CallToolResult's
// text, isError and _meta; or the McpError thrown, with its code and data). A pause step prints
// {"paused": NAME} and waits for one line on stdin.
import { createInterface } from "node:readline";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { readFileSync } from "node:fs";

const STEP_DEADLINE_MS = 60_000; // a step that has not finished by then is reported, not waited for forever

const [url, task, planJson] = process.argv.slice(2);
const plan = JSON.parse(planJson);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

function emit(line) {
  process.stdout.write(JSON.stringify(line) + "\n");
}

function seenResult(result) {
  return {
    isError: Boolean(result.isError),
    texts: (result.content ?? []).filter((b) => b.type === "text").map((b) => b.text),
    meta: result._meta ?? null,
    structuredContent: result.structuredContent ?? null,
  };
}

function seenError(error) {
  if (error && typeof error.code === "number") {
    return { error: { code: error.code, message: error.message, data: error.data ?? null } };
  }
  return { exception: String(error?.stack ?? error).slice(0, 2000) };
}

async function step(client, planStep) {
  const options = { timeout: STEP_DEADLINE_MS };
  try {
    if (planStep.do === "list") {
      const listed = await client.listTools(undefined, options);
      return { tools: listed.tools.map((t) => ({ name: t.name, description: t.description ?? null })) };
    }
    return seenResult(await client.callTool({ name: planStep.tool, arguments: planStep.arguments ?? {} }, undefined, options));
  } catch (error) {
    return seenError(error);
  }
}

async function main() {
  const sdk = JSON.parse(readFileSync(new URL("./node_modules/@modelcontextprotocol/sdk/package.json", import.meta.url))).version;
  emit({ client: "typescript", sdk, node: process.version });
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: task ? { "X-Agent-Task": task } : {} },
  });
  const client = new Client({ name: "sidecar-test-agent", version: "0.0.0" });
  const transportErrors = [];
  client.onerror = (error) => transportErrors.push(String(error).slice(0, 500));
  try {
    await client.connect(transport, { timeout: STEP_DEADLINE_MS });
    for (const [index, planStep] of plan.entries()) {
      if (planStep.do === "pause") {
        emit({ paused: planStep.name });
        await lines.next();
        continue;
      }
      emit({ step: index, ...(await step(client, planStep)) });
    }
  } catch (error) {
    emit({ fatal: String(error?.stack ?? error).slice(0, 4000), transportErrors });
    process.exit(3);
  }
  await client.close();
  emit({ done: true, transportErrors });
  process.exit(0);
}

main();
