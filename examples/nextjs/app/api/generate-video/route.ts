// POST /api/generate-video {"seconds": 12, "resolution": "1080p"}: holds the price of the job,
// renders, charges what it really cost; 402 with the numbers when credits are short.
import { InsufficientCreditsError } from "@tally/client";
import { accountOf, tally } from "../../../lib/tally";

async function render(seconds: number, resolution: string): Promise<{ url: string; seconds: number }> {
  // The generation service's work; here a stand-in that "renders" a bit less than asked.
  return { url: `https://cdn.example.com/videos/${crypto.randomUUID()}.mp4?r=${resolution}`, seconds: Math.max(1, seconds - 1) };
}

export async function POST(request: Request): Promise<Response> {
  const account = accountOf(request);
  if (!account) return Response.json({ error: "sign in first" }, { status: 401 });
  const { seconds = 10, resolution = "1080p" } = (await request.json()) as { seconds?: number; resolution?: string };
  let video: { url: string; seconds: number } | undefined;
  try {
    const settled = await tally.withCredits(account, { operation: "video_export", params: { seconds, resolution } }, async () => {
      video = await render(seconds, resolution);
      // The real cost: the same price table, for what was actually rendered.
      return tally.estimate("video_export", { seconds: video.seconds, resolution });
    });
    return Response.json({ video: video?.url, charged: settled.hold.committedAmount, available: settled.available });
  } catch (e) {
    if (e instanceof InsufficientCreditsError) {
      return Response.json(
        { error: "insufficient credits", available: e.available, requested: e.requested },
        { status: 402 },
      );
    }
    throw e;
  }
}
