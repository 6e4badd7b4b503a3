// Drive the web chat page in headless Chromium: node web_page.cjs URL SCREENSHOT.png
// Prints one JSON object: the user message, the reply, how many DOM mutations the streamed reply
// made (one per content delta), the status line, and whether the page overflows a 375px screen.
const { chromium } = require("playwright-core");

(async () => {
  const [url, shot] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 375, height: 740 } });
    await page.goto(url);
    await page.fill("#temperature", "0");
    await page.fill("#max-tokens", "24");
    await page.evaluate(() => {
      window.__updates = 0;
      // Count mutation records, not callbacks: the observer batches records per microtask, and
      // a fast server's whole reply can arrive in one network read.
      new MutationObserver((records) => { window.__updates += records.length; }).observe(document.getElementById("log"), {
        subtree: true, childList: true, characterData: true,
      });
    });
    await page.fill("#input", "Hello there");
    await page.press("#input", "Enter");
    await page.waitForFunction(
      () => document.getElementById("status").textContent.includes("·"), null, { timeout: 60000 });
    const result = {
      user: await page.textContent(".msg.user"),
      reply: await page.textContent(".msg.assistant"),
      updates: await page.evaluate(() => window.__updates),
      status: await page.textContent("#status"),
      overflow: await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth),
    };
    await page.screenshot({ path: shot });
    console.log(JSON.stringify(result));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
