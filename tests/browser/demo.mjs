// Drives the docs-page demo in headless Chromium: tab 2 waits (blocking
// read), tab 1 sends; tab 2 must receive tab 1's message and tab 1 the ack.
// Usage: node demo.mjs http://127.0.0.1:PORT
import { chromium } from "playwright-core";

const base = process.argv[2];
const room = "r" + Math.random().toString(36).slice(2, 8);
const message = "hello-from-tab-1";
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const context = await browser.newContext();
  const receiver = await context.newPage();
  await receiver.goto(`${base}/?room=${room}&role=recv`);
  await receiver.waitForFunction(() => document.getElementById("status").textContent === "waiting");
  const sender = await context.newPage();
  await sender.goto(`${base}/?room=${room}&role=send&msg=${message}`);
  await receiver.waitForFunction((m) => document.getElementById("received").textContent === m, message, { timeout: 15000 });
  await sender.waitForFunction((m) => document.getElementById("received").textContent === "ack:" + m, message, { timeout: 15000 });
  console.log(JSON.stringify({
    received: await receiver.textContent("#received"),
    answered: await sender.textContent("#received"),
  }));
} finally {
  await browser.close();
}
